//! Prices: `"$0.001"` to atomic token units with exact decimal math.

use alloy_primitives::U256;

/// Why a price string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PriceError {
    /// Not `[$]digits[.digits]`: signs, exponents, commas, spaces inside, or empty.
    #[error("price {0:?} is not a plain decimal number")]
    Malformed(String),
    /// More fractional digits than the token has decimals (would need rounding).
    #[error("price {price:?} has more than {decimals} fractional digits")]
    TooPrecise {
        /// The price as given.
        price: String,
        /// The token's decimals.
        decimals: u8,
    },
    /// Larger than a uint256 can hold.
    #[error("price {0:?} overflows uint256")]
    Overflow(String),
}

/// Parses a decimal price (an optional leading `$`, surrounding whitespace allowed) into atomic
/// units of a token with `decimals` decimals. Never uses floating point.
///
/// ```
/// use tower_x402::price::parse_price;
/// use tower_x402::primitives::U256;
/// assert_eq!(parse_price("$0.001", 6).unwrap(), U256::from(1000));
/// assert_eq!(parse_price("2.5", 6).unwrap(), U256::from(2_500_000));
/// assert!(parse_price("$0.0000001", 6).is_err()); // needs 7 decimals
/// ```
pub fn parse_price(price: &str, decimals: u8) -> Result<U256, PriceError> {
    let malformed = || PriceError::Malformed(price.to_owned());
    let s = price.trim();
    let s = s.strip_prefix('$').unwrap_or(s);
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
        return Err(malformed());
    }
    if frac.len() > usize::from(decimals) {
        // Trailing zeros carry no value: "$0.0010000" is fine for 6 decimals.
        let (keep, extra) = frac.split_at(usize::from(decimals));
        if !extra.bytes().all(|b| b == b'0') {
            return Err(PriceError::TooPrecise {
                price: price.to_owned(),
                decimals,
            });
        }
        return parse_price(&format!("{int}.{keep}"), decimals);
    }
    let mut atomic = String::with_capacity(int.len() + usize::from(decimals));
    atomic.push_str(int);
    atomic.push_str(frac);
    atomic.extend(std::iter::repeat_n('0', usize::from(decimals) - frac.len()));
    let atomic = atomic.trim_start_matches('0');
    if atomic.is_empty() {
        return Ok(U256::ZERO);
    }
    U256::from_str_radix(atomic, 10).map_err(|_| PriceError::Overflow(price.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_from_the_spec() {
        let p = |s| parse_price(s, 6);
        assert_eq!(p("$0.01"), Ok(U256::from(10_000)));
        assert_eq!(p("$0.001"), Ok(U256::from(1000)));
        assert_eq!(p("$1"), Ok(U256::from(1_000_000)));
        assert_eq!(p("2.5"), Ok(U256::from(2_500_000)));
        assert_eq!(p("$0.000001"), Ok(U256::from(1)));
        assert_eq!(p(" $0.0157 "), Ok(U256::from(15_700)));
        assert_eq!(p("$1.005"), Ok(U256::from(1_005_000)));
        assert_eq!(p(".5"), Ok(U256::from(500_000)));
        assert_eq!(p("3."), Ok(U256::from(3_000_000)));
        assert_eq!(p("$0.0010000"), Ok(U256::from(1000)));
        assert_eq!(p("0"), Ok(U256::ZERO));
        assert!(matches!(
            p("$0.0000001"),
            Err(PriceError::TooPrecise { .. })
        ));
        assert!(matches!(
            p("$0.0000015"),
            Err(PriceError::TooPrecise { .. })
        ));
    }

    #[test]
    fn refuses_non_decimals() {
        for bad in [
            "", "$", ".", "-1", "+1", "1e3", "1,000", "0x10", "1 000", "$$1", "1.2.3", "NaN",
        ] {
            assert!(
                matches!(parse_price(bad, 6), Err(PriceError::Malformed(_))),
                "{bad}"
            );
        }
        let huge = "9".repeat(80);
        assert!(matches!(
            parse_price(&huge, 6),
            Err(PriceError::Overflow(_))
        ));
    }
}
