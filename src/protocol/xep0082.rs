//! XEP-0082 date-times: parsing the `start`/`end` bounds a client sends and formatting the
//! `<delay stamp=...>` of result messages, as Unix time in microseconds.
//!
//! [`parse`] accepts exactly what Prosody's `util.datetime.parse` accepts (util/datetime.lua),
//! including its leniency (optional dashes, out-of-range fields normalised like `mktime`, a
//! loosely matched zone offset), and keeps the fraction of a second as trunk does.
//! [`format`] writes trunk's form: whole seconds as `...SSZ`, otherwise `...SS.ffffffZ`.
//!
//! This module only converts between text and numbers; it does not know what the times bound.

const MICROS: i64 = 1_000_000;
const DAY: i64 = 86_400;

/// Parses an XEP-0082 date-time into Unix time in microseconds, or `None` when Prosody's
/// `datetime.parse` would return nil.
///
/// The shape is `YYYY[-]MM[-]DDTHH:MM:SS[.fff...][zone]` where the zone is empty (UTC), `Z`, or
/// anything containing a sign and two hour digits, optionally followed by `:` and two minute
/// digits (any other number of minute digits counts as zero minutes), as in Prosody. Digits
/// after the seconds without a `.` are ignored (as in 0.12). The fraction is kept to the
/// microsecond and truncated beyond it.
pub fn parse(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let mut p = Cursor { b, pos: 0 };

    let year = p.digits(4)?;
    p.optional(b'-');
    let month = p.digits(2)?;
    p.optional(b'-');
    let day = p.digits(2)?;
    p.expect(b'T')?;
    let hour = p.digits(2)?;
    p.expect(b':')?;
    let min = p.digits(2)?;
    p.expect(b':')?;
    let sec = p.digits(2)?;
    let dot = p.optional(b'.');
    let fraction = p.digit_run();
    let frac_micros = if dot { fraction_micros(fraction) } else { 0 };
    let offset = zone_offset(&b[p.pos..])?;

    // os.time() normalises out-of-range fields like mktime: linear in every field.
    let months = year * 12 + (month - 1);
    let days = days_from_civil(months.div_euclid(12), months.rem_euclid(12) + 1, 1) + (day - 1);
    let secs = days * DAY + hour * 3600 + min * 60 + sec - offset;
    // Like stock (os.time), out-of-range fields and offsets may carry the instant outside the
    // years 0000-9999; as a query bound that is simply before or after every message.
    Some(secs * MICROS + frac_micros)
}

/// Formats Unix time in microseconds as an XEP-0082 date-time in UTC:
/// `YYYY-MM-DDTHH:MM:SSZ` for a whole second, else `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub fn format(micros: i64) -> String {
    let secs = micros.div_euclid(MICROS);
    let frac = micros.rem_euclid(MICROS);
    let days = secs.div_euclid(DAY);
    let tod = secs.rem_euclid(DAY);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (tod / 3600, tod / 60 % 60, tod % 60);
    if frac == 0 {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
    } else {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{frac:06}Z")
    }
}

/// A forward-only reader over ASCII bytes.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    /// Exactly `n` ASCII digits as a number.
    fn digits(&mut self, n: usize) -> Option<i64> {
        let run = self.b.get(self.pos..self.pos + n)?;
        if !run.iter().all(u8::is_ascii_digit) {
            return None;
        }
        self.pos += n;
        Some(run.iter().fold(0, |v, d| v * 10 + i64::from(d - b'0')))
    }

    /// Consumes `c` if it is next; says whether it did.
    fn optional(&mut self, c: u8) -> bool {
        let found = self.b.get(self.pos) == Some(&c);
        self.pos += usize::from(found);
        found
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        self.optional(c).then_some(())
    }

    /// The longest run of ASCII digits from here (possibly empty).
    fn digit_run(&mut self) -> &[u8] {
        let start = self.pos;
        while self.b.get(self.pos).is_some_and(u8::is_ascii_digit) {
            self.pos += 1;
        }
        &self.b[start..self.pos]
    }
}

/// The first six fraction digits as microseconds, padded with zeros on the right.
fn fraction_micros(digits: &[u8]) -> i64 {
    (0..6).fold(0, |v, i| {
        v * 10 + digits.get(i).map_or(0, |d| i64::from(d - b'0'))
    })
}

/// The zone designator's offset east of UTC in seconds, matched as loosely as Prosody does
/// (`tzd:match("([+%-])(%d%d):?(%d*)")`, unanchored); `None` when it has no such part.
fn zone_offset(tzd: &[u8]) -> Option<i64> {
    if tzd.is_empty() || tzd == b"Z" {
        return Some(0);
    }
    let start = (0..tzd.len()).find(|&i| {
        matches!(tzd[i], b'+' | b'-')
            && tzd.get(i + 1).is_some_and(u8::is_ascii_digit)
            && tzd.get(i + 2).is_some_and(u8::is_ascii_digit)
    })?;
    let mut p = Cursor {
        b: tzd,
        pos: start + 1,
    };
    let hours = p.digits(2)?;
    p.optional(b':');
    let minute_digits = p.digit_run();
    let minutes = match minute_digits {
        [a, b] => i64::from(a - b'0') * 10 + i64::from(b - b'0'),
        _ => 0,
    };
    let offset = hours * 3600 + minutes * 60;
    Some(if tzd[start] == b'-' { -offset } else { offset })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2010-07-10T23:08:25Z, the XEP-0313 example bound.
    const T: i64 = 1_278_803_305 * MICROS;

    #[test]
    fn parses_xep_examples() {
        assert_eq!(parse("2010-06-07T00:00:00Z"), Some(1_275_868_800 * MICROS));
        assert_eq!(parse("2010-07-10T23:08:25Z"), Some(T));
        assert_eq!(parse("1970-01-01T00:00:00Z"), Some(0));
    }

    #[test]
    fn zone_may_be_absent_and_dashes_optional() {
        assert_eq!(parse("2010-07-10T23:08:25"), Some(T));
        assert_eq!(parse("20100710T23:08:25Z"), Some(T));
        assert_eq!(parse("2010-0710T23:08:25Z"), Some(T));
    }

    #[test]
    fn offsets_are_honoured() {
        assert_eq!(parse("2010-07-11T01:08:25+02:00"), Some(T));
        assert_eq!(parse("2010-07-10T18:38:25-04:30"), Some(T));
        assert_eq!(parse("2010-07-11T01:08:25+0200"), Some(T));
        // Hours only, or a minute part that is not two digits, counts as zero minutes.
        assert_eq!(parse("2010-07-11T01:08:25+02"), Some(T));
        assert_eq!(parse("2010-07-11T01:08:25+02:3"), Some(T));
        assert_eq!(parse("2010-07-11T01:08:25+02:300"), Some(T));
        // Prosody matches the offset anywhere in the zone part.
        assert_eq!(parse("2010-07-11T01:08:25Z+02:00"), Some(T));
        assert_eq!(parse("2010-07-10T23:08:25+00:00"), Some(T));
        assert_eq!(parse("2010-07-10T23:08:25-00:00"), Some(T));
    }

    #[test]
    fn fraction_is_kept_to_the_microsecond() {
        assert_eq!(parse("2010-07-10T23:08:25.5Z"), Some(T + 500_000));
        assert_eq!(parse("2010-07-10T23:08:25.123456Z"), Some(T + 123_456));
        assert_eq!(parse("2010-07-10T23:08:25.1234569Z"), Some(T + 123_456));
        assert_eq!(parse("2010-07-10T23:08:25.Z"), Some(T));
        assert_eq!(parse("2010-07-11T01:08:25.25+02:00"), Some(T + 250_000));
        // Digits without a dot are not a fraction (0.12 behaviour).
        assert_eq!(parse("2010-07-10T23:08:25123Z"), Some(T));
    }

    #[test]
    fn out_of_range_fields_are_normalised_like_mktime() {
        assert_eq!(parse("2010-07-10T23:08:85Z"), Some(T + 60 * MICROS));
        assert_eq!(parse("2009-19-10T23:08:25Z"), Some(T));
        assert_eq!(parse("2010-06-40T23:08:25Z"), Some(T));
        assert_eq!(parse("2010-07-09T47:08:25Z"), Some(T));
        assert_eq!(parse("2010-00-01T00:00:00Z"), parse("2009-12-01T00:00:00Z"));
        assert_eq!(parse("2010-03-00T00:00:00Z"), parse("2010-02-28T00:00:00Z"));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "yesterday",
            "2010-07-10",
            "2010-07-10 23:08:25Z",
            "2010-07-10t23:08:25Z",
            "2010-07-10T23:08Z",
            "2010-07-10T23:8:25Z",
            "10-07-10T23:08:25Z",
            "2010--07-10T23:08:25Z",
            " 2010-07-10T23:08:25Z",
            "2010-07-10T23:08:25z",
            "2010-07-10T23:08:25 Z",
            "2010-07-10T23:08:25Zjunk",
            "2010-07-10T23:08:25+2:00",
            "2010-07-10T23:08:25+",
            "２０１０-07-10T23:08:25Z",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn formats_whole_and_fractional_seconds() {
        assert_eq!(format(T), "2010-07-10T23:08:25Z");
        assert_eq!(format(T + 1), "2010-07-10T23:08:25.000001Z");
        assert_eq!(format(T + 500_000), "2010-07-10T23:08:25.500000Z");
        assert_eq!(format(0), "1970-01-01T00:00:00Z");
        assert_eq!(format(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(format(951_782_400 * MICROS), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn format_round_trips_and_agrees_with_chrono() {
        for micros in [
            0,
            T,
            T + 123_456,
            -86_400 * MICROS,
            4_102_444_800 * MICROS - 1,
            253_402_300_799 * MICROS,
            1_763_683_200_123_456,
        ] {
            let text = format(micros);
            assert_eq!(parse(&text), Some(micros), "{text}");
            let chrono = chrono::DateTime::from_timestamp_micros(micros).unwrap();
            let expected = if micros % MICROS == 0 {
                chrono.format("%Y-%m-%dT%H:%M:%SZ").to_string()
            } else {
                chrono.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
            };
            assert_eq!(text, expected);
        }
    }

    #[test]
    fn civil_conversions_agree_over_a_long_range() {
        for days in (-800_000..800_000).step_by(97) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn out_of_range_dates_normalise_as_stock_and_round_trip_within_four_digit_years() {
        // As stock's os.time(): a date an offset carries outside 0000-9999 is still a bound.
        assert!(
            parse("0000-01-01T00:00:00+01:00").unwrap() < parse("0000-01-01T00:00:00Z").unwrap()
        );
        assert!(
            parse("9999-12-31T23:59:59-01:00").unwrap() > parse("9999-12-31T23:59:59Z").unwrap()
        );
        // Every instant format can write with a four-digit year parses back (fuzzed property).
        for edge in [
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "2026-11-21T01:02:03.000004Z",
        ] {
            let t = parse(edge).unwrap();
            assert_eq!(parse(&format(t)), Some(t));
        }
    }
}
