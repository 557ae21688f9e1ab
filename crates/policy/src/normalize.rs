//! Request path normalization before authorization, as Istio configures
//! Envoy (`meshConfig.pathNormalization`). Without it, `/public/../admin`
//! would slip past a DENY on `/admin*`.

use std::borrow::Cow;

use meshward_config::PathNormalization;

/// Why a path is refused outright (the proxy answers 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// `%00` in the path.
    EncodedNul,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathError::EncodedNul => f.write_str("path contains an encoded NUL (%00)"),
        }
    }
}

/// Strips the query and fragment and normalizes the path:
/// - `NONE`: nothing more;
/// - `BASE`: `\` becomes `/`, percent-encoded unreserved characters are
///   decoded, dot segments are removed (RFC 3986 section 5.2.4); `%2F` and
///   `%5C` stay encoded and repeated slashes stay;
/// - `MERGE_SLASHES`: BASE, then repeated slashes are merged;
/// - `DECODE_AND_MERGE_SLASHES`: `%2F` and `%5C` are decoded to `/` first.
pub fn normalize_path(raw: &str, mode: PathNormalization) -> Result<Cow<'_, str>, PathError> {
    let merge = matches!(
        mode,
        PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes
    );
    // One pass finds where the path ends (the query or fragment) and
    // whether anything in it needs normalizing: a percent-encoding, a
    // backslash, a dot segment, or (when merging) a double slash. Most
    // paths need nothing, and are returned as they are.
    let mut end = raw.len();
    let mut needs_work = false;
    let mut prev = 0u8;
    for (i, &b) in raw.as_bytes().iter().enumerate() {
        match b {
            b'?' | b'#' => {
                end = i;
                break;
            }
            b'%' | b'\\' => needs_work = true,
            b'.' if prev == b'/' => needs_work = true,
            b'/' if merge && prev == b'/' => needs_work = true,
            _ => {}
        }
        prev = b;
    }
    let path = &raw[..end];
    if mode == PathNormalization::None || !needs_work {
        return Ok(Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    let decode_slashes = mode == PathNormalization::DecodeAndMergeSlashes;
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() {
            if let Some(v) = hex_pair(bytes[i + 1], bytes[i + 2]) {
                if v == 0 {
                    return Err(PathError::EncodedNul);
                }
                if is_unreserved(v) {
                    out.push(v);
                    i += 3;
                    continue;
                }
                if decode_slashes && (v == b'/' || v == b'\\') {
                    out.push(b'/');
                    i += 3;
                    continue;
                }
            }
            out.push(b);
            i += 1;
        } else if b == b'\\' {
            out.push(b'/');
            i += 1;
        } else {
            out.push(b);
            i += 1;
        }
    }
    let mut result = remove_dot_segments(&out);
    if merge {
        result.dedup_by(|a, b| *a == b'/' && *b == b'/');
    }
    // Only ASCII bytes were replaced by ASCII bytes, so UTF-8 is preserved;
    // fall back to a lossy conversion rather than panic if that ever changed.
    Ok(Cow::Owned(String::from_utf8(result).unwrap_or_else(|e| {
        String::from_utf8_lossy(e.as_bytes()).into_owned()
    })))
}

fn hex_pair(a: u8, b: u8) -> Option<u8> {
    let h = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    Some(h(a)? << 4 | h(b)?)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 section 5.2.4.
fn remove_dot_segments(input: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(input.len());
    let mut inp = input;
    while !inp.is_empty() {
        if inp.starts_with(b"../") {
            inp = &inp[3..];
        } else if inp.starts_with(b"./") || inp.starts_with(b"/./") {
            inp = &inp[2..];
        } else if inp == b"/." {
            inp = b"/";
        } else if inp.starts_with(b"/../") || inp == b"/.." {
            inp = if inp.len() == 3 { b"/" } else { &inp[3..] };
            let cut = out.iter().rposition(|b| *b == b'/').unwrap_or(0);
            out.truncate(cut);
        } else if inp == b"." || inp == b".." {
            inp = b"";
        } else {
            let start = usize::from(inp[0] == b'/');
            let end = inp[start..]
                .iter()
                .position(|b| *b == b'/')
                .map_or(inp.len(), |p| p + start);
            out.extend_from_slice(&inp[..end]);
            inp = &inp[end..];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use PathNormalization::*;

    #[test]
    fn istio_integration_vectors() {
        // (input, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES), from Istio's
        // path normalization integration test table.
        let cases = [
            ("/app/../admin", "/admin", "/admin", "/admin"),
            ("/app//", "/app//", "/app/", "/app/"),
            ("/app/%2f", "/app/%2f", "/app/%2f", "/app/"),
            (
                "/xyz%30..//abc",
                "/xyz0..//abc",
                "/xyz0../abc",
                "/xyz0../abc",
            ),
            ("/app/%2E./admin", "/admin", "/admin", "/admin"),
            ("/app\\admin", "/app/admin", "/app/admin", "/app/admin"),
            (
                "/app/\\/\\/\\admin",
                "/app//////admin",
                "/app/admin",
                "/app/admin",
            ),
            (
                "/%2Fapp%5cadmin%5Cabc",
                "/%2Fapp%5cadmin%5Cabc",
                "/%2Fapp%5cadmin%5Cabc",
                "/app/admin/abc",
            ),
            (
                "/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc",
                "/%5Capp%2f%5c%2F..%2fadmin%5c/abc",
                "/%5Capp%2f%5c%2F..%2fadmin%5c/abc",
                "/app/admin/abc",
            ),
            ("/app//../admin", "/app/admin", "/app/admin", "/app/admin"),
            ("/app//../../admin", "/admin", "/admin", "/admin"),
            ("/app#foo", "/app", "/app", "/app"),
        ];
        for (input, base, merge, decode) in cases {
            assert_eq!(normalize_path(input, Base).unwrap(), base, "BASE {input}");
            assert_eq!(
                normalize_path(input, MergeSlashes).unwrap(),
                merge,
                "MERGE {input}"
            );
            assert_eq!(
                normalize_path(input, DecodeAndMergeSlashes).unwrap(),
                decode,
                "DECODE {input}"
            );
        }
    }

    #[test]
    fn query_and_none() {
        assert_eq!(normalize_path("/a?x=/../b", Base).unwrap(), "/a");
        assert_eq!(normalize_path("/a/../b?q", None).unwrap(), "/a/../b");
        assert!(matches!(
            normalize_path("/plain/path", Base).unwrap(),
            Cow::Borrowed(_)
        ));
        assert_eq!(normalize_path("/a%00b", Base), Err(PathError::EncodedNul));
        assert_eq!(normalize_path("/a%zz/%4", Base).unwrap(), "/a%zz/%4");
    }
}
