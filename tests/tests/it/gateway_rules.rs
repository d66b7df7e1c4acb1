//! Pure request-parsing rules of the gateway.

use meshnode_gateway::http::parse_range;

#[track_caller]
fn check(value: &str, size: u64, expected: Result<Option<std::ops::Range<u64>>, u16>) {
    let got = parse_range(Some(value), size).map_err(|e| e.status.as_u16());
    assert_eq!(got, expected, "Range {value:?} of {size}");
}

#[test]
fn range_headers() {
    check("bytes=0-0", 10, Ok(Some(0..1)));
    check("bytes=0-9", 10, Ok(Some(0..10)));
    check("bytes=0-100", 10, Ok(Some(0..10)));
    check("bytes=5-", 10, Ok(Some(5..10)));
    check("bytes=-3", 10, Ok(Some(7..10)));
    check("bytes=-30", 10, Ok(Some(0..10)));
    check(" bytes=2-3 ", 10, Ok(Some(2..4)));
    check("bytes=0-1,4-5", 10, Ok(None));
    check("bytes=10-", 10, Err(416));
    check("bytes=10-12", 10, Err(416));
    check("bytes=5-4", 10, Err(416));
    check("bytes=-0", 10, Err(416));
    check("bytes=a-b", 10, Err(416));
    check("bytes=+1-2", 10, Err(416));
    check("bytes=", 10, Err(416));
    check("bytes=-", 10, Err(416));
    // An unknown unit is ignored (the whole blob); unit names are case-insensitive.
    check("items=0-1", 10, Ok(None));
    check("Bytes=0-1", 10, Ok(Some(0..2)));
    check("BYTES=8-", 10, Ok(Some(8..10)));
    // An end past the blob is clamped, however large.
    check("bytes=0-99999999999999999999999", 10, Ok(Some(0..10)));
    check("bytes=3-18446744073709551615", 10, Ok(Some(3..10)));
    check("0-1", 10, Err(416));
    check("bytes=0-1", 0, Err(416));
    check("bytes=99999999999999999999999-", 10, Err(416));
    assert_eq!(
        parse_range(None, 10).map_err(|e| e.status.as_u16()),
        Ok(None)
    );
}
