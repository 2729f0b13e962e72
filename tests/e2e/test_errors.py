"""Query errors (exact type/condition/text), addressing, and the iq-get search form (reference §2.3, §2.4, §5)."""

import pytest

from conftest import NS_DATA, NS_MAM

FORM_TYPE_TEXT = "Unexpected FORM_TYPE, expected 'urn:xmpp:mam:2'"


@pytest.fixture(scope="module")
def alice(server, connect_module):
    a = connect_module(server, "alice")
    b = connect_module(server, "bob")
    a.send_message("bob@localhost", "so the archive is not empty")
    b.wait_body("so the archive is not empty")
    return a


def assert_error(r, etype, condition, text=None):
    assert r.iq.xml is not None, "no reply"
    assert r.iq.type == "error", "expected an error, got %r" % (r.iq,)
    assert (r.iq.error_type, r.iq.condition) == (etype, condition)
    if text is not None:
        assert r.iq.text == text
    assert r.messages == []


@pytest.mark.parametrize("kw", [
    {"form_type": "urn:xmpp:mam:1"},
    {"form_type": "urn:xmpp:mam:2#extended"},
    {"form_type": None, "fields": {"with": "bob@localhost"}},
    {"raw_form": "<x xmlns='jabber:x:data' type='submit'/>"},
], ids=["mam1", "extended", "missing", "empty_form"])
def test_wrong_form_type(alice, kw):
    assert_error(alice.mam(**kw), "modify", "bad-request", FORM_TYPE_TEXT)


@pytest.mark.mam_rs_only
def test_form_type_without_value(alice):
    # Stock 0.12 raises a Lua error here and never replies.
    r = alice.mam(raw_form="<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'/></x>",
                  timeout=10)
    assert_error(r, "modify", "bad-request")


@pytest.mark.parametrize("field,value", [
    ("start", "not-a-date"),
    ("start", ""),
    ("start", "2020-01-01"),
    ("end", "yesterday"),
])
def test_invalid_timestamp(alice, field, value):
    assert_error(alice.mam(fields={field: value}), "modify", "bad-request", "invalid timestamp")


@pytest.mark.parametrize("value", ["a@b@c", "@localhost", "bob@localhost/", ""])
def test_invalid_with(alice, value):
    assert_error(alice.mam(fields={"with": value}), "modify", "bad-request", "Invalid JID: " + value)


@pytest.mark.parametrize("kw", [
    {"rsm": {"after": "no-such-id"}},
    {"rsm": {"before": "no-such-id"}},
    {"rsm": {"max": 5, "after": "no-such-id"}},
    {"fields": {"after-id": "no-such-id"}},
    {"fields": {"before-id": "no-such-id"}},
], ids=["rsm_after", "rsm_before", "rsm_after_max5", "form_after_id", "form_before_id"])
def test_unknown_id(alice, kw):
    assert_error(alice.mam(**kw), "modify", "item-not-found")


def test_unknown_after_with_max_zero_is_not_an_error(alice):
    r = alice.mam_ok(rsm={"max": 0, "after": "no-such-id"})
    assert r.complete and r.count >= 1


def test_query_to_another_users_archive(alice):
    assert_error(alice.mam(to="bob@localhost"), "cancel", "service-unavailable")


def test_query_to_own_bare_jid_is_allowed(alice):
    r = alice.mam_ok(to="alice@localhost")
    assert r.complete and len(r.messages) >= 1


def test_unknown_fields_and_rsm_index_are_ignored(alice):
    r = alice.mam_ok(fields={"x-unknown": "whatever"}, rsm={"max": 10, "index": 5})
    assert r.complete and len(r.messages) >= 1


def test_query_form(alice):
    r = alice.iq("get", "<query xmlns='urn:xmpp:mam:2'/>")
    assert r.type == "result"
    form = r.xml.find("{%s}query/{%s}x" % (NS_MAM, NS_DATA))
    assert form is not None
    assert form.get("type") == "form"
    fields = [(f.get("var"), f.get("type")) for f in form.findall("{%s}field" % NS_DATA)]
    assert fields == [
        ("FORM_TYPE", "hidden"),
        ("with", "jid-single"),
        ("start", "text-single"),
        ("end", "text-single"),
        ("before-id", "text-single"),
        ("after-id", "text-single"),
        ("ids", "list-multi"),
    ]
    ft = form.find("{%s}field[@var='FORM_TYPE']" % NS_DATA)
    assert ft.findtext("{%s}value" % NS_DATA) == "urn:xmpp:mam:2"
    for var in ("start", "end"):
        v = form.find("{%s}field[@var='%s']/{http://jabber.org/protocol/xdata-validate}validate" % (NS_DATA, var))
        assert v is not None and v.get("datatype") == "xs:dateTime"
