//! XEP-0004 data forms, only as far as MAM needs them: reading the fields of a submitted form
//! ([`SubmittedForm`], with Prosody's util/dataforms.lua reading rules) and building a form to
//! offer ([`Form`], [`Field`]).
//!
//! Reading does not validate or convert values (JIDs, dates): the caller knows each field's
//! meaning and does that, as a Prosody form layout would. This module knows no field names
//! other than `FORM_TYPE`.

use super::{attr_name, ns, text_only};
use minidom::Element;

/// The XEP-0004 field types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Boolean,
    Fixed,
    Hidden,
    JidMulti,
    JidSingle,
    ListMulti,
    ListSingle,
    TextMulti,
    TextPrivate,
    TextSingle,
}

impl FieldType {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::Boolean => "boolean",
            FieldType::Fixed => "fixed",
            FieldType::Hidden => "hidden",
            FieldType::JidMulti => "jid-multi",
            FieldType::JidSingle => "jid-single",
            FieldType::ListMulti => "list-multi",
            FieldType::ListSingle => "list-single",
            FieldType::TextMulti => "text-multi",
            FieldType::TextPrivate => "text-private",
            FieldType::TextSingle => "text-single",
        }
    }

    /// The type named by a `type` attribute, `None` for an unknown name.
    pub fn from_name(name: &str) -> Option<FieldType> {
        [
            FieldType::Boolean,
            FieldType::Fixed,
            FieldType::Hidden,
            FieldType::JidMulti,
            FieldType::JidSingle,
            FieldType::ListMulti,
            FieldType::ListSingle,
            FieldType::TextMulti,
            FieldType::TextPrivate,
            FieldType::TextSingle,
        ]
        .into_iter()
        .find(|t| t.as_str() == name)
    }
}

/// The `type` of a form (`<x type=...>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormKind {
    Form,
    Submit,
    Cancel,
    Result,
}

impl FormKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FormKind::Form => "form",
            FormKind::Submit => "submit",
            FormKind::Cancel => "cancel",
            FormKind::Result => "result",
        }
    }
}

/// What a submitted form says its `FORM_TYPE` is (Prosody's `dataforms.get_type`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormType {
    /// There is no `FORM_TYPE` field (Prosody: `""`).
    Absent,
    /// The `FORM_TYPE` field has no `<value>`, or its value holds elements (Prosody: nil).
    NoValue,
    /// The text of the field's first `<value>`.
    Value(String),
}

/// A read-only view of a form a client sent, `<x xmlns="jabber:x:data">`.
///
/// Fields are looked up by `var`; the first `<field>` with that `var` counts, and the
/// submitted `type` attributes are ignored (the reader's layout decides each field's type).
#[derive(Debug, Clone, Copy)]
pub struct SubmittedForm<'a> {
    x: &'a Element,
}

impl<'a> SubmittedForm<'a> {
    /// The form in an element, `None` unless it is `<x xmlns="jabber:x:data">`.
    pub fn new(x: &'a Element) -> Option<SubmittedForm<'a>> {
        x.is("x", ns::DATA_FORMS).then_some(SubmittedForm { x })
    }

    /// The first `<x xmlns="jabber:x:data">` child of `parent`.
    pub fn find_in(parent: &'a Element) -> Option<SubmittedForm<'a>> {
        parent
            .get_child("x", ns::DATA_FORMS)
            .map(|x| SubmittedForm { x })
    }

    /// The form element itself.
    pub fn element(&self) -> &'a Element {
        self.x
    }

    /// The form's `FORM_TYPE`, read as Prosody's `dataforms.get_type` does.
    pub fn form_type(&self) -> FormType {
        match self.field("FORM_TYPE") {
            None => FormType::Absent,
            Some(field) => field.text().map_or(FormType::NoValue, FormType::Value),
        }
    }

    /// The first field with this `var`.
    pub fn field(&self, var: &str) -> Option<SubmittedField<'a>> {
        self.x
            .children()
            .find(|f| f.is("field", ns::DATA_FORMS) && f.attr("var") == Some(var))
            .map(|el| SubmittedField { el })
    }
}

/// One `<field>` of a [`SubmittedForm`].
#[derive(Debug, Clone, Copy)]
pub struct SubmittedField<'a> {
    el: &'a Element,
}

impl<'a> SubmittedField<'a> {
    /// The field element itself.
    pub fn element(&self) -> &'a Element {
        self.el
    }

    /// The text of the first `<value>` (a single-valued field). `None` when there is no
    /// `<value>` or the first one holds elements; `Some("")` for an empty `<value/>`.
    pub fn text(&self) -> Option<String> {
        self.el
            .get_child("value", ns::DATA_FORMS)
            .and_then(text_only)
    }

    /// The text of every `<value>` that holds only text, in order (a multi-valued field).
    pub fn texts(&self) -> Vec<String> {
        self.el
            .children()
            .filter(|v| v.is("value", ns::DATA_FORMS))
            .filter_map(text_only)
            .collect()
    }
}

/// A field of a form to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub var: String,
    pub kind: FieldType,
    /// A `<validate xmlns="http://jabber.org/protocol/xdata-validate" datatype=...>` hint.
    pub datatype: Option<String>,
    pub values: Vec<String>,
}

impl Field {
    /// A field with no values and no datatype.
    pub fn new(var: &str, kind: FieldType) -> Field {
        Field {
            var: var.to_owned(),
            kind,
            datatype: None,
            values: Vec::new(),
        }
    }

    /// The hidden `FORM_TYPE` field.
    pub fn form_type(value: &str) -> Field {
        Field::new("FORM_TYPE", FieldType::Hidden).with_value(value)
    }

    pub fn with_value(mut self, value: &str) -> Field {
        self.values.push(value.to_owned());
        self
    }

    pub fn with_datatype(mut self, datatype: &str) -> Field {
        self.datatype = Some(datatype.to_owned());
        self
    }
}

impl From<&Field> for Element {
    /// `<field type= var=>`, then the `<validate/>` hint, then one `<value>` per value.
    fn from(f: &Field) -> Element {
        let mut el = Element::builder("field", ns::DATA_FORMS)
            .attr(attr_name("type"), f.kind.as_str())
            .attr(attr_name("var"), f.var.as_str());
        if let Some(datatype) = &f.datatype {
            el = el.append(
                Element::builder("validate", ns::XDATA_VALIDATE)
                    .attr(attr_name("datatype"), datatype.as_str())
                    .build(),
            );
        }
        for value in &f.values {
            el = el.append(
                Element::builder("value", ns::DATA_FORMS)
                    .append(value.as_str())
                    .build(),
            );
        }
        el.build()
    }
}

/// A form to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Form {
    pub kind: FormKind,
    pub fields: Vec<Field>,
}

impl From<&Form> for Element {
    fn from(form: &Form) -> Element {
        Element::builder("x", ns::DATA_FORMS)
            .attr(attr_name("type"), form.kind.as_str())
            .append_all(form.fields.iter().map(Element::from))
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(xml: &str) -> Element {
        xml.parse().unwrap()
    }

    const X: &str = "xmlns='jabber:x:data'";

    #[test]
    fn form_type_is_read_like_prosody() {
        let x = el(&format!(
            "<x {X} type='submit'><field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field></x>"
        ));
        let form = SubmittedForm::new(&x).unwrap();
        assert_eq!(form.form_type(), FormType::Value("urn:xmpp:mam:2".into()));

        let x = el(&format!("<x {X} type='submit'/>"));
        assert_eq!(
            SubmittedForm::new(&x).unwrap().form_type(),
            FormType::Absent
        );

        let x = el(&format!("<x {X}><field var='FORM_TYPE'/></x>"));
        assert_eq!(
            SubmittedForm::new(&x).unwrap().form_type(),
            FormType::NoValue
        );

        let x = el(&format!(
            "<x {X}><field var='FORM_TYPE'><value><b/></value></field></x>"
        ));
        assert_eq!(
            SubmittedForm::new(&x).unwrap().form_type(),
            FormType::NoValue
        );

        let x = el(&format!(
            "<x {X}><field var='FORM_TYPE'><value/></field></x>"
        ));
        assert_eq!(
            SubmittedForm::new(&x).unwrap().form_type(),
            FormType::Value(String::new())
        );
    }

    #[test]
    fn only_data_forms_elements_count() {
        assert!(SubmittedForm::new(&el("<x xmlns='urn:other'/>")).is_none());
        let x = el(&format!(
            "<x {X}><field xmlns='urn:other' var='a'><value>1</value></field>\
             <field var='a'><value xmlns='urn:other'>2</value><value>3</value></field></x>"
        ));
        let form = SubmittedForm::new(&x).unwrap();
        let a = form.field("a").unwrap();
        assert_eq!(a.text().as_deref(), Some("3"));
        assert_eq!(a.texts(), ["3"]);
    }

    #[test]
    fn first_field_with_a_var_wins() {
        let x = el(&format!(
            "<x {X}><field var='a'><value>1</value></field><field var='a'><value>2</value></field></x>"
        ));
        let form = SubmittedForm::new(&x).unwrap();
        assert_eq!(form.field("a").unwrap().text().as_deref(), Some("1"));
        assert!(form.field("b").is_none());
    }

    #[test]
    fn values_are_read_like_prosody() {
        let x = el(&format!(
            "<x {X}><field var='none'/><field var='empty'><value/></field>\
             <field var='multi'><value>a</value><value><b/></value><value/><value>c</value></field>\
             <field var='nested'><value><b/></value><value>x</value></field></x>"
        ));
        let form = SubmittedForm::new(&x).unwrap();
        assert_eq!(form.field("none").unwrap().text(), None);
        assert!(form.field("none").unwrap().texts().is_empty());
        assert_eq!(form.field("empty").unwrap().text().as_deref(), Some(""));
        assert_eq!(form.field("multi").unwrap().texts(), ["a", "", "c"]);
        // Only the first <value> counts for a single value.
        assert_eq!(form.field("nested").unwrap().text(), None);
    }

    #[test]
    fn finds_the_form_in_a_parent() {
        let q = el(&format!(
            "<query xmlns='urn:xmpp:mam:2'><x xmlns='urn:other'/><x {X}/></query>"
        ));
        let form = SubmittedForm::find_in(&q).unwrap();
        assert!(form.element().is("x", ns::DATA_FORMS));
    }

    #[test]
    fn builds_a_form() {
        let form = Form {
            kind: FormKind::Form,
            fields: vec![
                Field::form_type("urn:example"),
                Field::new("when", FieldType::TextSingle).with_datatype("xs:dateTime"),
            ],
        };
        let x = Element::from(&form);
        assert_eq!(
            String::from(&x),
            "<x xmlns='jabber:x:data' type='form'>\
             <field type='hidden' var='FORM_TYPE'><value>urn:example</value></field>\
             <field type='text-single' var='when'>\
             <validate xmlns='http://jabber.org/protocol/xdata-validate' datatype='xs:dateTime'/>\
             </field></x>"
        );
        let read = SubmittedForm::new(&x).unwrap();
        assert_eq!(read.form_type(), FormType::Value("urn:example".into()));
    }

    #[test]
    fn field_type_names_round_trip() {
        for name in [
            "boolean",
            "fixed",
            "hidden",
            "jid-multi",
            "jid-single",
            "list-multi",
            "list-single",
            "text-multi",
            "text-private",
            "text-single",
        ] {
            assert_eq!(FieldType::from_name(name).unwrap().as_str(), name);
        }
        assert_eq!(FieldType::from_name("text"), None);
    }
}
