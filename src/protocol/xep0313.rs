//! XEP-0313 message archive management, the query side: parsing a client's
//! `<query xmlns="urn:xmpp:mam:2">` ([`MamQuery`]), turning it into a store query and paging
//! plan ([`Plan`], stock mod_mam.lua:138-167), building the result messages and `<fin/>` from a
//! store page ([`respond`], mod_mam.lua:178-229), and the search form ([`query_form`]).
//!
//! Behaviour follows stock Prosody mod_mam (see the behaviour reference, §2.4-2.6 and §5),
//! with two deliberate fixes: a `FORM_TYPE` field without a value and a negative or fractional
//! RSM `<max/>` are answered with `bad-request` instead of no reply or a nonsense page.
//!
//! This module never touches the store, threads or Lua: it maps to and from
//! [`crate::store::Query`] and [`crate::store::Page`] values only. Who may query which archive
//! is decided elsewhere.

use super::tree::{Builder, Tree};
use super::xep0004::{Field, FieldType, Form, FormKind, FormType, SubmittedForm};
use super::xep0059::{SetQuery, SetResult};
use super::{attr_name, ns, stored, xep0082, PreppedJid, StanzaError};
use crate::id::ArchiveId;
use crate::store::{Page, Query};
use minidom::Element;

/// The error text for a missing or foreign `FORM_TYPE` (mod_mam.lua:123).
pub const UNEXPECTED_FORM_TYPE: &str = "Unexpected FORM_TYPE, expected 'urn:xmpp:mam:2'";

/// The error text for a `FORM_TYPE` field without a value (stock raises a Lua error and sends
/// no reply; this is our answer instead).
pub const FORM_TYPE_WITHOUT_VALUE: &str = "Invalid dataform: the FORM_TYPE field has no value";

/// The error text for an unparseable or empty `start`/`end` (dataforms.lua:335).
pub const INVALID_TIMESTAMP: &str = "invalid timestamp";

/// A parsed archive query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MamQuery {
    /// The `queryid` attribute, echoed on each result.
    pub queryid: Option<String>,
    /// The `with` field, prepared and reduced to a bare JID.
    pub with: Option<String>,
    /// The `start` field, Unix microseconds.
    pub start: Option<i64>,
    /// The `end` field, Unix microseconds.
    pub end: Option<i64>,
    /// The `before-id` field; an empty value gives `Some("")`.
    pub before_id: Option<String>,
    /// The `after-id` field; an empty value gives `Some("")`.
    pub after_id: Option<String>,
    /// The `ids` field; `None` when it has no values.
    pub ids: Option<Vec<String>>,
    /// The RSM `<set/>`, when it has at least one child element.
    pub rsm: Option<SetQuery>,
    /// A `<flip-page/>` child in the `urn:xmpp:mam:2` namespace.
    pub flip_page: bool,
}

/// Paging limits from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Page size when the client sends no RSM `<max/>` (stock: 20).
    pub default_max: u32,
    /// `max_archive_query_results` (stock: 50): larger requests are clamped to this.
    pub max_max: u32,
    /// `mam_include_total`: ask the store for a `<count/>` on every query.
    pub include_total: bool,
    /// `mam_rs_max_ids_per_query`: most values in the extended `ids` field.
    pub max_ids: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            default_max: 20,
            max_max: 50,
            include_total: true,
            max_ids: 1000,
        }
    }
}

/// What to ask the store, and how to page its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The store query. Its `limit` is one more than `qmax` so that a full page can tell
    /// whether more results remain (or 0 when `qmax` is 0).
    pub store: Query,
    /// The page size.
    pub qmax: u32,
    /// The page is taken from the newest end (an RSM `<before>`, empty or not).
    pub reverse: bool,
    /// Send the page in the opposite order from the store's.
    pub flip: bool,
}

/// The stanzas that answer a query.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// The result `<message/>`s, in the order they go on the wire.
    pub messages: Vec<Tree>,
    /// The `<fin/>` for the `<iq type="result">`.
    pub fin: Element,
    /// No more results remain beyond this page.
    pub complete: bool,
    /// One description per stored message that could not be read and was left out.
    pub skipped: Vec<String>,
    /// The largest id of the page, for smart retention's client marks (clients may know
    /// imported messages by other ids).
    pub newest: Option<ArchiveId>,
}

impl MamQuery {
    /// Parses a `<query xmlns="urn:xmpp:mam:2">` element of an `<iq type="set">`.
    ///
    /// Errors are `modify`/`bad-request` with stock's texts: [`UNEXPECTED_FORM_TYPE`],
    /// [`FORM_TYPE_WITHOUT_VALUE`], [`INVALID_TIMESTAMP`], `Invalid JID: <raw>`, or the RSM
    /// `<max/>` error of [`SetQuery::parse`]. When several form fields are invalid, the first in
    /// form order (with, start, end) is reported. Unknown form fields are ignored.
    pub fn parse(query: &Element) -> Result<MamQuery, StanzaError> {
        if !query.is("query", ns::MAM) {
            return Err(StanzaError::bad_request(
                "Expected <query xmlns='urn:xmpp:mam:2'/>",
            ));
        }
        let mut q = MamQuery {
            queryid: query.attr("queryid").map(str::to_owned),
            flip_page: query.has_child("flip-page", ns::MAM),
            ..MamQuery::default()
        };
        if let Some(form) = SubmittedForm::find_in(query) {
            match form.form_type() {
                FormType::Value(v) if v == ns::MAM => {}
                FormType::NoValue => return Err(StanzaError::bad_request(FORM_TYPE_WITHOUT_VALUE)),
                FormType::Value(_) | FormType::Absent => {
                    return Err(StanzaError::bad_request(UNEXPECTED_FORM_TYPE))
                }
            }
            let text = |var: &str| form.field(var).and_then(|f| f.text());
            if let Some(raw) = text("with") {
                q.with = Some(
                    bare_jid(&raw)
                        .ok_or_else(|| StanzaError::bad_request(format!("Invalid JID: {raw}")))?,
                );
            }
            q.start = text("start").map(|s| timestamp(&s)).transpose()?;
            q.end = text("end").map(|s| timestamp(&s)).transpose()?;
            q.before_id = text("before-id");
            q.after_id = text("after-id");
            q.ids = form
                .field("ids")
                .map(|f| f.texts())
                .filter(|ids| !ids.is_empty());
        }
        q.rsm = SetQuery::get(query)?;
        Ok(q)
    }

    /// Checks the query against the server's limits (beyond what stock has): too many `ids`
    /// is a `bad-request` naming the limit.
    pub fn within(&self, limits: &Limits) -> Result<(), StanzaError> {
        match &self.ids {
            Some(ids) if ids.len() > limits.max_ids => Err(StanzaError::bad_request(format!(
                "Too many ids: {}, at most {} are accepted (mam_rs_max_ids_per_query)",
                ids.len(),
                limits.max_ids
            ))),
            _ => Ok(()),
        }
    }

    /// The store query and paging plan for this query (mod_mam.lua:138-167).
    ///
    /// - `qmax` = RSM `<max/>` (else `default_max`), clamped to `max_max`.
    /// - `reverse` when there is an RSM `<before>`, empty or not.
    /// - RSM `<before>`/`<after>` win over the form's `before-id`/`after-id`; an empty RSM
    ///   `<before/>` gives no before id at all, even when the form has one.
    /// - `flip` = `reverse` XOR `<flip-page/>`.
    /// - The store limit is `qmax + 1` (0 when `qmax` is 0); a total is asked for when
    ///   `include_total` or `qmax` is 0.
    pub fn plan(&self, limits: &Limits) -> Plan {
        let rsm = self.rsm.as_ref();
        let qmax = rsm
            .and_then(|s| s.max)
            .unwrap_or(limits.default_max)
            .min(limits.max_max);
        let rsm_before = rsm.and_then(|s| s.before.as_deref());
        let reverse = rsm_before.is_some();
        let before = match rsm_before {
            Some("") => None,
            Some(id) => Some(id.to_owned()),
            None => self.before_id.clone(),
        };
        let after = rsm
            .and_then(|s| s.after.clone())
            .or_else(|| self.after_id.clone());
        Plan {
            store: Query {
                with: self.with.clone(),
                start: self.start,
                end: self.end,
                after,
                before,
                ids: self.ids.clone(),
                limit: Some(if qmax == 0 { 0 } else { qmax.saturating_add(1) }),
                reverse,
                total: limits.include_total || qmax == 0,
            },
            qmax,
            reverse,
            flip: reverse != self.flip_page,
        }
    }
}

/// A `<fin xmlns="urn:xmpp:mam:2">`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fin {
    /// `complete="true"`; when false the attribute is absent (never `"false"`).
    pub complete: bool,
    pub set: SetResult,
}

impl From<&Fin> for Element {
    fn from(fin: &Fin) -> Element {
        Element::builder("fin", ns::MAM)
            .attr(attr_name("complete"), fin.complete.then_some("true"))
            .append(Element::from(&fin.set))
            .build()
    }
}

impl TryFrom<&Element> for Fin {
    type Error = StanzaError;

    /// Reads a `<fin/>`: `complete` is true for `"true"` or `"1"`; a missing `<set/>` reads
    /// as an empty one.
    fn try_from(el: &Element) -> Result<Fin, StanzaError> {
        if !el.is("fin", ns::MAM) {
            return Err(StanzaError::bad_request(
                "Expected <fin xmlns='urn:xmpp:mam:2'/>",
            ));
        }
        Ok(Fin {
            complete: matches!(el.attr("complete"), Some("true" | "1")),
            set: match el.get_child("set", ns::RSM) {
                Some(set) => SetResult::try_from(set)?,
                None => SetResult::default(),
            },
        })
    }
}

/// Builds the answer to a query from the store's page (mod_mam.lua:178-229).
///
/// At most `plan.qmax` items are used; one more in the page means more results remain
/// (`complete` false). Each item becomes `<message [to] [from]><result [queryid] id>
/// <forwarded><delay stamp/><message xmlns="jabber:client" .../></forwarded></result>
/// </message>`. With `plan.flip` the messages are in the opposite order from the page.
/// `<first>`/`<last>` are the chronologically first and last ids of the page.
///
/// A stored stanza that cannot be parsed is left out and described in `skipped`; its id still
/// counts for the page size and for `<first>`/`<last>`, so that paging moves past it.
pub fn respond(
    query: &MamQuery,
    plan: &Plan,
    page: Page,
    to: Option<&str>,
    from: Option<&str>,
) -> Response {
    let mut complete = true;
    let mut messages = Vec::new();
    let mut skipped = Vec::new();
    let (mut first, mut last): (Option<String>, Option<String>) = (None, None);
    let mut newest = None;
    for (count, item) in page.items.into_iter().enumerate() {
        if count as u64 >= u64::from(plan.qmax) {
            complete = false;
            break;
        }
        newest = newest.max(Some(item.id));
        let id = item.client_id();
        let stamp = xep0082::format(item.id.micros());
        let queryid = query.queryid.as_deref();
        match result_message(to, from, queryid, &id, &stamp, &item.stanza) {
            Ok(message) => messages.push(message),
            Err(e) => skipped.push(format!("id {id}: {e}")),
        }
        if first.is_none() {
            first = Some(id.clone());
        }
        last = Some(id);
    }
    if plan.flip {
        messages.reverse();
    }
    if plan.reverse {
        std::mem::swap(&mut first, &mut last);
    }
    let fin = Element::from(&Fin {
        complete,
        set: SetResult {
            first,
            last,
            count: page.total,
        },
    });
    Response {
        messages,
        fin,
        complete,
        skipped,
        newest,
    }
}

/// The search form served for `<iq type="get"><query xmlns="urn:xmpp:mam:2"/></iq>`
/// (reference §2.4): FORM_TYPE, with, start, end, before-id, after-id, ids.
pub fn query_form() -> Element {
    let datetime = |var: &str| Field::new(var, FieldType::TextSingle).with_datatype("xs:dateTime");
    let form = Form {
        kind: FormKind::Form,
        fields: vec![
            Field::form_type(ns::MAM),
            Field::new("with", FieldType::JidSingle),
            datetime("start"),
            datetime("end"),
            Field::new("before-id", FieldType::TextSingle),
            Field::new("after-id", FieldType::TextSingle),
            Field::new("ids", FieldType::ListMulti),
        ],
    };
    Element::builder("query", ns::MAM)
        .append(Element::from(&form))
        .build()
}

/// Prosody's `jid.bare(jid.prep(raw))`: `None` when `raw` is not a valid JID.
fn bare_jid(raw: &str) -> Option<String> {
    PreppedJid::parse(raw).map(|j| j.bare())
}

fn timestamp(s: &str) -> Result<i64, StanzaError> {
    xep0082::parse(s).ok_or_else(|| StanzaError::bad_request(INVALID_TIMESTAMP))
}

/// `<message [to] [from]><result [queryid] id><forwarded><delay stamp/>` and the stored
/// stanza, or why the stored stanza cannot be read.
fn result_message(
    to: Option<&str>,
    from: Option<&str>,
    queryid: Option<&str>,
    id: &str,
    stamp: &str,
    stored: &str,
) -> Result<Tree, String> {
    let mut b = Builder::with_capacity(stored.len() + 256, 32);
    b.start("message", ns::CLIENT);
    if let Some(to) = to {
        b.attr("to", to);
    }
    if let Some(from) = from {
        b.attr("from", from);
    }
    b.start("result", ns::MAM);
    if let Some(queryid) = queryid {
        b.attr("queryid", queryid);
    }
    b.attr("id", id);
    b.start("forwarded", ns::FORWARD);
    b.start("delay", ns::DELAY);
    b.attr("stamp", stamp);
    b.end();
    stored::read_into(&mut b, stored)?;
    b.end();
    b.end();
    b.end();
    Ok(b.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::ArchiveId;
    use crate::protocol::ErrorType;
    use crate::store::Item;

    fn el(xml: &str) -> Element {
        xml.parse().unwrap()
    }

    /// A query with a form holding `fields` (raw XML) and `extra` children after it.
    fn query_xml(fields: &str, extra: &str) -> Element {
        el(&format!(
            "<query xmlns='urn:xmpp:mam:2' queryid='f27'>\
             <x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>\
             {fields}</x>{extra}</query>"
        ))
    }

    fn rsm(inner: &str) -> String {
        format!("<set xmlns='http://jabber.org/protocol/rsm'>{inner}</set>")
    }

    fn parse(fields: &str, extra: &str) -> Result<MamQuery, StanzaError> {
        MamQuery::parse(&query_xml(fields, extra))
    }

    fn field(var: &str, value: &str) -> String {
        format!("<field var='{var}'><value>{value}</value></field>")
    }

    fn assert_bad_request(result: Result<MamQuery, StanzaError>, text: &str) {
        let err = result.unwrap_err();
        assert_eq!(err.kind, ErrorType::Modify);
        assert_eq!(err.condition, "bad-request");
        assert_eq!(err.text.as_deref(), Some(text));
    }

    // ---- parsing ----

    #[test]
    fn bare_query_has_no_constraints() {
        let q = MamQuery::parse(&el("<query xmlns='urn:xmpp:mam:2'/>")).unwrap();
        assert_eq!(q, MamQuery::default());
        let plan = q.plan(&Limits::default());
        assert_eq!(
            plan.store,
            Query {
                limit: Some(21),
                total: true,
                ..Query::default()
            }
        );
        assert_eq!((plan.qmax, plan.reverse, plan.flip), (20, false, false));
    }

    #[test]
    fn xep0313_example_with_start_end() {
        // XEP-0313 §4.1.1-4.1.2: filtering by JID and by time.
        let q = parse(
            &[
                field("with", "juliet@capulet.lit"),
                field("start", "2010-06-07T00:00:00Z"),
                field("end", "2010-07-07T13:23:54Z"),
            ]
            .concat(),
            "",
        )
        .unwrap();
        assert_eq!(q.queryid.as_deref(), Some("f27"));
        assert_eq!(q.with.as_deref(), Some("juliet@capulet.lit"));
        assert_eq!(q.start, Some(1_275_868_800_000_000));
        assert_eq!(q.end, Some(1_278_509_034_000_000));
        let plan = q.plan(&Limits::default());
        assert_eq!(plan.store.with.as_deref(), Some("juliet@capulet.lit"));
        assert_eq!(plan.store.start, q.start);
        assert_eq!(plan.store.end, q.end);
    }

    #[test]
    fn with_is_prepared_and_made_bare() {
        let with = |raw: &str| parse(&field("with", raw), "").unwrap().with;
        assert_eq!(
            with("Juliet@Capulet.LIT/Balcony").as_deref(),
            Some("juliet@capulet.lit")
        );
        assert_eq!(with("capulet.lit").as_deref(), Some("capulet.lit"));
        assert_eq!(with("capulet.lit/res").as_deref(), Some("capulet.lit"));
        assert_eq!(
            with("juliet@capulet.lit.").as_deref(),
            Some("juliet@capulet.lit")
        );
    }

    #[test]
    fn invalid_with_is_bad_request() {
        for raw in [
            "",
            "juliet@@capulet.lit",
            "@capulet.lit",
            "juliet@capulet.lit/",
            "a b@c",
        ] {
            assert_bad_request(
                parse(&field("with", raw), ""),
                &format!("Invalid JID: {raw}"),
            );
        }
    }

    #[test]
    fn invalid_timestamps_are_bad_request() {
        for var in ["start", "end"] {
            for raw in ["", "yesterday", "2010-06-07"] {
                assert_bad_request(parse(&field(var, raw), ""), INVALID_TIMESTAMP);
            }
        }
    }

    #[test]
    fn timestamp_offsets_are_honoured() {
        let q = parse(&field("start", "2010-06-07T02:00:00+02:00"), "").unwrap();
        assert_eq!(q.start, Some(1_275_868_800_000_000));
    }

    #[test]
    fn first_invalid_field_in_form_order_is_reported() {
        let fields = [field("end", "x"), field("start", "y"), field("with", "")].concat();
        assert_bad_request(parse(&fields, ""), "Invalid JID: ");
    }

    #[test]
    fn form_type_errors() {
        let missing = el(
            "<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'>\
             <field var='with'><value>juliet@capulet.lit</value></field></x></query>",
        );
        assert_bad_request(MamQuery::parse(&missing), UNEXPECTED_FORM_TYPE);
        assert_eq!(
            UNEXPECTED_FORM_TYPE,
            "Unexpected FORM_TYPE, expected 'urn:xmpp:mam:2'"
        );

        let wrong = el("<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:1</value></field></x></query>");
        assert_bad_request(MamQuery::parse(&wrong), UNEXPECTED_FORM_TYPE);

        let no_value = el(
            "<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE' type='hidden'/></x></query>",
        );
        assert_bad_request(MamQuery::parse(&no_value), FORM_TYPE_WITHOUT_VALUE);
    }

    #[test]
    fn form_in_another_namespace_is_ignored() {
        let q = el("<query xmlns='urn:xmpp:mam:2'><x xmlns='urn:other'>\
             <field var='FORM_TYPE'><value>nope</value></field></x></query>");
        assert_eq!(MamQuery::parse(&q).unwrap(), MamQuery::default());
    }

    #[test]
    fn not_a_mam_query_is_bad_request() {
        let err = MamQuery::parse(&el("<query xmlns='urn:xmpp:mam:1'/>")).unwrap_err();
        assert_eq!(err.condition, "bad-request");
    }

    #[test]
    fn unknown_fields_and_valueless_fields_are_ignored() {
        let fields = [
            field("favourite-colour", "blue"),
            "<field var='with'/><field var='start'/><field var='ids'/>".to_owned(),
        ]
        .concat();
        let q = parse(&fields, "").unwrap();
        assert_eq!((q.with, q.start, q.ids), (None, None, None));
    }

    #[test]
    fn id_fields() {
        let fields = [
            field("before-id", ""),
            field("after-id", "09af3-cc343-b409f"),
            "<field var='ids' type='list-multi'><value>28482-98726-73623</value>\
             <value>09af3-cc343-b409f</value></field>"
                .to_owned(),
        ]
        .concat();
        let q = parse(&fields, "").unwrap();
        assert_eq!(q.before_id.as_deref(), Some(""));
        assert_eq!(q.after_id.as_deref(), Some("09af3-cc343-b409f"));
        assert_eq!(
            q.ids,
            Some(vec!["28482-98726-73623".into(), "09af3-cc343-b409f".into()])
        );
        let plan = q.plan(&Limits::default());
        assert_eq!(plan.store.before.as_deref(), Some(""));
        assert_eq!(plan.store.after.as_deref(), Some("09af3-cc343-b409f"));
        assert_eq!(plan.store.ids, q.ids);
        assert!(!plan.reverse);
    }

    #[test]
    fn negative_rsm_max_is_bad_request() {
        assert_bad_request(
            parse("", &rsm("<max>-1</max>")),
            "Invalid RSM <max/>: expected a non-negative integer",
        );
        assert_bad_request(
            parse("", &rsm("<max>2.5</max>")),
            "Invalid RSM <max/>: expected a non-negative integer",
        );
    }

    // ---- planning ----

    #[test]
    fn rsm_before_empty_is_the_last_page() {
        // XEP-0313 §5.3 / XEP-0059 §2.5: <max>10</max><before/>.
        let q = parse("", &rsm("<max>10</max><before/>")).unwrap();
        let plan = q.plan(&Limits::default());
        assert!(plan.reverse && plan.flip);
        assert_eq!(plan.qmax, 10);
        assert_eq!(plan.store.limit, Some(11));
        assert_eq!(plan.store.before, None);
        assert!(plan.store.reverse);
    }

    #[test]
    fn rsm_before_id_pages_backwards() {
        let q = parse("", &rsm("<max>10</max><before>09af3-cc343-b409f</before>")).unwrap();
        let plan = q.plan(&Limits::default());
        assert!(plan.reverse && plan.flip && plan.store.reverse);
        assert_eq!(plan.store.before.as_deref(), Some("09af3-cc343-b409f"));
    }

    #[test]
    fn flip_page() {
        // XEP-0313 §4.3.3: forward query with <flip-page/>.
        let q = parse("", &format!("{}<flip-page/>", rsm("<max>5</max>"))).unwrap();
        assert!(q.flip_page);
        let plan = q.plan(&Limits::default());
        assert!(!plan.reverse && plan.flip);

        // Backward with <flip-page/>: the flips cancel out.
        let q = parse("", &format!("{}<flip-page/>", rsm("<before/>"))).unwrap();
        let plan = q.plan(&Limits::default());
        assert!(plan.reverse && !plan.flip);

        // Only in the MAM namespace.
        let q = parse("", "<flip-page xmlns='urn:other'/>").unwrap();
        assert!(!q.flip_page);
    }

    #[test]
    fn rsm_ids_override_form_ids() {
        let form = [
            field("before-id", "form-before"),
            field("after-id", "form-after"),
        ]
        .concat();

        let plan = parse(&form, &rsm("<after>rsm-after</after>"))
            .unwrap()
            .plan(&Limits::default());
        assert_eq!(plan.store.after.as_deref(), Some("rsm-after"));
        assert_eq!(plan.store.before.as_deref(), Some("form-before"));
        assert!(!plan.reverse);

        let plan = parse(&form, &rsm("<before>rsm-before</before><after/>"))
            .unwrap()
            .plan(&Limits::default());
        assert_eq!(plan.store.before.as_deref(), Some("rsm-before"));
        assert_eq!(plan.store.after.as_deref(), Some(""));
        assert!(plan.reverse);

        // An empty RSM <before/> kills the form's before-id.
        let plan = parse(&form, &rsm("<before/>"))
            .unwrap()
            .plan(&Limits::default());
        assert_eq!(plan.store.before, None);
        assert_eq!(plan.store.after.as_deref(), Some("form-after"));
        assert!(plan.reverse);

        // A form before-id alone does not reverse.
        let plan = parse(&form, "").unwrap().plan(&Limits::default());
        assert_eq!(plan.store.before.as_deref(), Some("form-before"));
        assert!(!plan.reverse && !plan.store.reverse);
    }

    #[test]
    fn max_is_defaulted_and_clamped() {
        let limits = Limits {
            default_max: 20,
            max_max: 50,
            include_total: false,
            ..Limits::default()
        };
        let qmax = |extra: &str| parse("", extra).unwrap().plan(&limits).qmax;
        assert_eq!(qmax(""), 20);
        assert_eq!(qmax(&rsm("<after>x</after>")), 20);
        assert_eq!(qmax(&rsm("<max>ten</max>")), 20);
        assert_eq!(qmax(&rsm("<max>7</max>")), 7);
        assert_eq!(qmax(&rsm("<max>50</max>")), 50);
        assert_eq!(qmax(&rsm("<max>100</max>")), 50);
        assert_eq!(qmax(&rsm("<max>99999999999</max>")), 50);
        let plan = parse("", &rsm("<max>100</max>")).unwrap().plan(&limits);
        assert_eq!(plan.store.limit, Some(51));
        assert!(!plan.store.total);

        let small = Limits {
            default_max: 20,
            max_max: 10,
            include_total: true,
            ..Limits::default()
        };
        assert_eq!(parse("", "").unwrap().plan(&small).qmax, 10);
    }

    #[test]
    fn too_many_ids_are_refused_naming_the_limit() {
        let form = |n: usize| {
            let values: String = (0..n).map(|i| format!("<value>id{i}</value>")).collect();
            format!("<field var='ids'>{values}</field>")
        };
        let limits = Limits {
            max_ids: 3,
            ..Limits::default()
        };
        assert!(parse(&form(3), "").unwrap().within(&limits).is_ok());
        let err = parse(&form(4), "").unwrap().within(&limits).unwrap_err();
        assert_eq!(err.condition, "bad-request");
        assert!(err.text.unwrap().contains("mam_rs_max_ids_per_query"));
    }

    #[test]
    fn max_zero_asks_for_the_count_only() {
        let limits = Limits {
            include_total: false,
            ..Limits::default()
        };
        let plan = parse("", &rsm("<max>0</max>")).unwrap().plan(&limits);
        assert_eq!(plan.qmax, 0);
        assert_eq!(plan.store.limit, Some(0));
        assert!(plan.store.total);
    }

    // ---- results ----

    const T0: i64 = 1_278_803_305_000_000; // 2010-07-10T23:08:25Z

    fn item(n: i64) -> Item {
        item_with(
            n,
            &format!(
                "<message xmlns='jabber:client' from='romeo@montague.lit/orchard' \
                 to='juliet@capulet.lit' type='chat' id='m{n}' xml:lang='en'><body>msg {n}</body></message>"
            ),
        )
    }

    fn item_with(n: i64, stanza: &str) -> Item {
        Item {
            id: id(n),
            key: None,
            with: "romeo@montague.lit".into(),
            stanza: stanza.into(),
        }
    }

    fn id(n: i64) -> ArchiveId {
        ArchiveId::first_at(T0 + n * 1_000_000)
    }

    fn page(ns: impl IntoIterator<Item = i64>, total: Option<u64>) -> Page {
        Page {
            items: ns.into_iter().map(item).collect(),
            total,
        }
    }

    /// The body texts of result messages, in wire order.
    fn bodies(r: &Response) -> Vec<String> {
        r.messages
            .iter()
            .map(|m| {
                m.to_element()
                    .get_child("result", ns::MAM)
                    .and_then(|r| r.get_child("forwarded", ns::FORWARD))
                    .and_then(|f| f.get_child("message", ns::CLIENT))
                    .and_then(|m| m.get_child("body", ns::CLIENT))
                    .unwrap()
                    .text()
            })
            .collect()
    }

    fn fin(r: &Response) -> Fin {
        Fin::try_from(&r.fin).unwrap()
    }

    fn run(extra: &str, p: Page) -> Response {
        let q = parse("", extra).unwrap();
        let plan = q.plan(&Limits::default());
        respond(&q, &plan, p, Some("juliet@capulet.lit/balcony"), None)
    }

    #[test]
    fn result_message_shape() {
        let q = parse("", &rsm("<max>5</max>")).unwrap();
        let plan = q.plan(&Limits::default());
        let r = respond(
            &q,
            &plan,
            page([1], Some(1)),
            Some("juliet@capulet.lit/balcony"),
            Some("juliet@capulet.lit"),
        );
        assert_eq!(r.messages.len(), 1);
        // Serialise and parse back: this is what goes on the wire.
        let wire: Element = String::from(&r.messages[0].to_element()).parse().unwrap();
        assert!(wire.is("message", ns::CLIENT));
        assert_eq!(wire.attr("to"), Some("juliet@capulet.lit/balcony"));
        assert_eq!(wire.attr("from"), Some("juliet@capulet.lit"));
        assert_eq!(wire.attr("id"), None);
        assert_eq!(wire.attr("type"), None);
        assert_eq!(wire.children().count(), 1);
        let result = wire.get_child("result", ns::MAM).unwrap();
        assert_eq!(result.attr("queryid"), Some("f27"));
        assert_eq!(result.attr("id"), Some(id(1).to_string().as_str()));
        let fwd = result.get_child("forwarded", ns::FORWARD).unwrap();
        let names: Vec<_> = fwd
            .children()
            .map(|c| (c.name().to_owned(), c.ns()))
            .collect();
        assert_eq!(
            names,
            [
                ("delay".to_owned(), ns::DELAY.to_owned()),
                ("message".to_owned(), ns::CLIENT.to_owned())
            ]
        );
        let delay = fwd.get_child("delay", ns::DELAY).unwrap();
        assert_eq!(delay.attr("stamp"), Some("2010-07-10T23:08:26Z"));
        let stored = fwd.get_child("message", ns::CLIENT).unwrap();
        assert_eq!(stored.attr("from"), Some("romeo@montague.lit/orchard"));
        assert_eq!(stored.attr("to"), Some("juliet@capulet.lit"));
        assert_eq!(stored.attr("type"), Some("chat"));
        assert_eq!(stored.attr("id"), Some("m1"));
        assert_eq!(
            stored.attr_ns("http://www.w3.org/XML/1998/namespace", "lang"),
            Some("en")
        );
        assert_eq!(
            stored.get_child("body", ns::CLIENT).unwrap().text(),
            "msg 1"
        );
    }

    #[test]
    fn no_to_from_or_queryid_when_absent() {
        let q = MamQuery::default();
        let plan = q.plan(&Limits::default());
        let r = respond(&q, &plan, page([1], None), None, None);
        let m = &r.messages[0].to_element();
        assert_eq!(m.attrs().iter().count(), 0);
        let result = m.get_child("result", ns::MAM).unwrap();
        assert_eq!(result.attr("queryid"), None);
        assert!(result.attr("id").is_some());
    }

    #[test]
    fn fractional_stamp() {
        let q = MamQuery::default();
        let plan = q.plan(&Limits::default());
        let mut p = page([], None);
        p.items.push(Item {
            id: ArchiveId::first_at(T0 + 250_000),
            ..item(0)
        });
        let r = respond(&q, &plan, p, None, None);
        let stamp = r.messages[0]
            .to_element()
            .get_child("result", ns::MAM)
            .and_then(|r| r.get_child("forwarded", ns::FORWARD))
            .and_then(|f| f.get_child("delay", ns::DELAY))
            .and_then(|d| d.attr("stamp"))
            .map(str::to_owned);
        assert_eq!(stamp.as_deref(), Some("2010-07-10T23:08:25.250000Z"));
    }

    #[test]
    fn forward_page_with_more_results() {
        // Store gives qmax + 1 = 3 items for max 2.
        let r = run(&rsm("<max>2</max>"), page([1, 2, 3], Some(10)));
        assert_eq!(bodies(&r), ["msg 1", "msg 2"]);
        assert!(!r.complete);
        assert_eq!(r.fin.attr("complete"), None);
        assert_eq!(
            fin(&r),
            Fin {
                complete: false,
                set: SetResult {
                    first: Some(id(1).to_string()),
                    last: Some(id(2).to_string()),
                    count: Some(10),
                },
            }
        );
    }

    #[test]
    fn last_page_is_complete() {
        let r = run(&rsm("<max>5</max>"), page([1, 2, 3], Some(3)));
        assert_eq!(bodies(&r), ["msg 1", "msg 2", "msg 3"]);
        assert!(r.complete);
        assert_eq!(r.fin.attr("complete"), Some("true"));
    }

    #[test]
    fn reverse_page_is_sent_chronologically() {
        // <before/>: the store returns newest first.
        let r = run(&rsm("<max>2</max><before/>"), page([5, 4, 3], Some(5)));
        assert_eq!(bodies(&r), ["msg 4", "msg 5"]);
        assert!(!r.complete);
        let f = fin(&r);
        assert_eq!(f.set.first, Some(id(4).to_string()));
        assert_eq!(f.set.last, Some(id(5).to_string()));
    }

    #[test]
    fn flip_page_orders() {
        // Forward + flip-page: newest to oldest, first/last still chronological.
        let r = run(
            &format!("{}<flip-page/>", rsm("<max>3</max>")),
            page([1, 2, 3], None),
        );
        assert_eq!(bodies(&r), ["msg 3", "msg 2", "msg 1"]);
        let f = fin(&r);
        assert_eq!(f.set.first, Some(id(1).to_string()));
        assert_eq!(f.set.last, Some(id(3).to_string()));
        assert_eq!(f.set.count, None);

        // Reverse + flip-page: newest to oldest as the store gave them.
        let r = run(
            &format!("{}<flip-page/>", rsm("<max>3</max><before/>")),
            page([3, 2, 1], None),
        );
        assert_eq!(bodies(&r), ["msg 3", "msg 2", "msg 1"]);
        let f = fin(&r);
        assert_eq!(f.set.first, Some(id(1).to_string()));
        assert_eq!(f.set.last, Some(id(3).to_string()));
    }

    #[test]
    fn max_zero_gives_count_only() {
        let r = run(&rsm("<max>0</max>"), page([], Some(42)));
        assert!(r.messages.is_empty());
        assert!(r.complete);
        let set = r.fin.get_child("set", ns::RSM).unwrap();
        let names: Vec<_> = set.children().map(|c| c.name().to_owned()).collect();
        assert_eq!(names, ["count"]);
        assert_eq!(set.get_child("count", ns::RSM).unwrap().text(), "42");
    }

    #[test]
    fn empty_page() {
        let r = run("", page([], None));
        assert!(r.messages.is_empty() && r.complete);
        let wire: Element = String::from(&r.fin).parse().unwrap();
        assert!(wire.is("fin", ns::MAM));
        assert_eq!(wire.attr("complete"), Some("true"));
        assert_eq!(wire.attr("queryid"), None);
        assert_eq!(
            wire.get_child("set", ns::RSM).unwrap().children().count(),
            0
        );
    }

    #[test]
    fn fin_never_says_false_nor_echoes_queryid() {
        let r = run(&rsm("<max>1</max>"), page([1, 2], None));
        let wire = String::from(&r.fin);
        assert!(!wire.contains("false"), "{wire}");
        assert!(!wire.contains("queryid"), "{wire}");
        assert!(!wire.contains("index"), "{wire}");
    }

    #[test]
    fn unreadable_items_are_skipped_but_keep_their_place() {
        let q = parse("", &rsm("<max>3</max>")).unwrap();
        let plan = q.plan(&Limits::default());
        let p = Page {
            items: vec![
                item(1),
                item(2),
                item_with(3, "<message xmlns='jabber:client'><body>"),
            ],
            total: Some(3),
        };
        let r = respond(&q, &plan, p, None, None);
        assert_eq!(bodies(&r), ["msg 1", "msg 2"]);
        assert_eq!(r.skipped.len(), 1);
        assert!(
            r.skipped[0].contains(&id(3).to_string()),
            "{}",
            r.skipped[0]
        );
        assert_eq!(fin(&r).set.last, Some(id(3).to_string()));
        assert!(r.complete);

        let p = Page {
            items: vec![item_with(1, ""), item_with(2, "not xml at all")],
            total: None,
        };
        let r = respond(&q, &plan, p, None, None);
        assert!(r.messages.is_empty());
        assert_eq!(r.skipped.len(), 2);
    }

    #[test]
    fn stored_stanza_is_put_in_jabber_client() {
        let q = MamQuery::default();
        let plan = q.plan(&Limits::default());
        let p = Page {
            items: vec![
                item_with(1, "<message to='a@b'><body>no ns</body></message>"),
                item_with(
                    2,
                    "<message xmlns='jabber:server' to='a@b'><body>s2s</body>\
                     <x xmlns='urn:other'><y/></x></message>",
                ),
            ],
            total: None,
        };
        let r = respond(&q, &plan, p, None, None);
        assert!(r.skipped.is_empty());
        for m in &r.messages {
            let wire: Element = String::from(&m.to_element()).parse().unwrap();
            let stored = wire
                .get_child("result", ns::MAM)
                .and_then(|r| r.get_child("forwarded", ns::FORWARD))
                .and_then(|f| f.get_child("message", ns::CLIENT))
                .unwrap();
            assert_eq!(stored.attr("to"), Some("a@b"));
        }
        assert_eq!(bodies(&r), ["no ns", "s2s"]);
        let foreign = r.messages[1].to_element();
        let foreign = foreign
            .get_child("result", ns::MAM)
            .and_then(|r| r.get_child("forwarded", ns::FORWARD))
            .and_then(|f| f.get_child("message", ns::CLIENT))
            .and_then(|m| m.get_child("x", "urn:other"))
            .unwrap();
        assert!(foreign.has_child("y", "urn:other"));
    }

    #[test]
    fn fin_round_trips() {
        for f in [
            Fin::default(),
            Fin {
                complete: true,
                set: SetResult {
                    first: Some("a".into()),
                    last: Some("b".into()),
                    count: Some(2),
                },
            },
        ] {
            assert_eq!(Fin::try_from(&Element::from(&f)), Ok(f));
        }
    }

    // ---- the form ----

    #[test]
    fn query_form_matches_the_reference() {
        let expected = el("<query xmlns='urn:xmpp:mam:2'>\
            <x type='form' xmlns='jabber:x:data'>\
            <field type='hidden' var='FORM_TYPE'><value>urn:xmpp:mam:2</value></field>\
            <field type='jid-single' var='with'/>\
            <field type='text-single' var='start'><validate datatype='xs:dateTime' xmlns='http://jabber.org/protocol/xdata-validate'/></field>\
            <field type='text-single' var='end'><validate datatype='xs:dateTime' xmlns='http://jabber.org/protocol/xdata-validate'/></field>\
            <field type='text-single' var='before-id'/>\
            <field type='text-single' var='after-id'/>\
            <field type='list-multi' var='ids'/></x></query>");
        assert_eq!(query_form(), expected);
        let wire: Element = String::from(&query_form()).parse().unwrap();
        assert_eq!(wire, expected);
    }
}

/// The `<metadata xmlns="urn:xmpp:mam:2">` reply (M:236-269): the first and last message of the
/// archive, each as `(id, Unix microseconds)`; an empty element for an empty archive.
pub fn metadata(first: Option<(&str, i64)>, last: Option<(&str, i64)>) -> Element {
    let mut el = Element::builder("metadata", ns::MAM);
    for (name, item) in [("start", first), ("end", last)] {
        if let Some((id, micros)) = item {
            el = el.append(
                Element::builder(name, ns::MAM)
                    .attr(attr_name("id"), id)
                    .attr(attr_name("timestamp"), xep0082::format(micros))
                    .build(),
            );
        }
    }
    el.build()
}

#[cfg(test)]
mod metadata_tests {
    use super::*;

    #[test]
    fn empty_archive_gives_an_empty_element() {
        let el = metadata(None, None);
        assert!(el.is("metadata", ns::MAM));
        assert_eq!(el.children().count(), 0);
    }

    #[test]
    fn start_and_end_carry_id_and_timestamp() {
        let el = metadata(Some(("a", 1_000_000)), Some(("b", 2_500_000)));
        let start = el.get_child("start", ns::MAM).unwrap();
        let end = el.get_child("end", ns::MAM).unwrap();
        assert_eq!(start.attr("id"), Some("a"));
        assert_eq!(start.attr("timestamp"), Some("1970-01-01T00:00:01Z"));
        assert_eq!(end.attr("id"), Some("b"));
        assert_eq!(end.attr("timestamp"), Some("1970-01-01T00:00:02.500000Z"));
    }
}
