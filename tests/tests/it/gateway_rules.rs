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

/// Seeded mutations of valid and invalid Range headers: always a range inside the blob, the
/// whole blob, or a 416, never a panic.
#[test]
fn mutated_range_headers_stay_inside_the_blob() {
    use rand::{RngExt, SeedableRng};
    let corpus = [
        "bytes=0-9",
        "bytes=5-",
        "bytes=-3",
        "Bytes=1-2,4-5",
        "items=0-1",
        "bytes=18446744073709551615-",
    ];
    let pieces = [
        "-",
        "=",
        ",",
        " ",
        "0",
        "9",
        "18446744073709551616",
        "+",
        "bytes",
        "\u{0}",
        "é",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for round in 0..20_000 {
        let mut text: Vec<char> = corpus[round % corpus.len()].chars().collect();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..=text.len());
            if rng.random_range(0..2) == 0 && at < text.len() {
                text.remove(at);
            } else {
                let piece = pieces[rng.random_range(0..pieces.len())];
                text.splice(at..at, piece.chars());
            }
        }
        let text: String = text.into_iter().collect();
        let size = rng.random_range(0..20u64);
        match parse_range(Some(&text), size) {
            Ok(Some(r)) => assert!(
                r.start < r.end && r.end <= size,
                "{text:?} of {size}: {r:?}"
            ),
            Ok(None) => {}
            Err(e) => assert_eq!(e.status.as_u16(), 416, "{text:?}"),
        }
    }
}
