//! Pricing one usage event — exact decimals and one rounding rule.
//!
//! Token counts follow the normalized usage convention: `prompt_tokens` counts **all** input tokens,
//! cached ones included, and `cached_input_tokens` is the part of them read from cache;
//! `completion_tokens` includes reasoning tokens. Prices are per million tokens.
//!
//! **Rounding rule** (the only one): each amount is computed exactly, then rounded once to 6
//! decimals, half away from zero — the scale of the `Decimal(12,6)` money columns. Sums over events
//! add rounded amounts, so a report always equals the sum of its rows.
//!
//! An event is priced three ways: `cost` at the tenant's price (falling back to the platform price),
//! `platform_cost` at the platform price (what a reseller owes the platform) and `upstream_cost` at
//! the channel's cost. A model without a platform price cannot be billed and is an error, never free;
//! a missing upstream cost is reported as `None` so margin reports can flag it.

use rust_decimal::{Decimal, RoundingStrategy};

/// Decimal places of every money amount.
pub const SCALE: u32 = 6;

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_input_tokens: u64,
}

/// Prices per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input: Decimal,
    pub output: Decimal,
    /// Cached input; the input price applies when absent.
    pub cached_input: Option<Decimal>,
}

/// An event priced three ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priced {
    pub cost: Decimal,
    pub platform_cost: Decimal,
    pub upstream_cost: Option<Decimal>,
}

/// Why an event cannot be priced (it goes to the dead-letter topic, visibly).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unpriced {
    #[error("model {0:?} has no platform price")]
    NoPlatformPrice(String),
}

/// The amount for `usage` at `price`, rounded by the rule above.
pub fn amount(usage: &Usage, price: &Price) -> Decimal {
    let cached = usage.cached_input_tokens.min(usage.prompt_tokens);
    let uncached = usage.prompt_tokens - cached;
    let exact = Decimal::from(uncached) * price.input
        + Decimal::from(cached) * price.cached_input.unwrap_or(price.input)
        + Decimal::from(usage.completion_tokens) * price.output;
    (exact / Decimal::from(1_000_000u32))
        .round_dp_with_strategy(SCALE, RoundingStrategy::MidpointAwayFromZero)
}

/// Prices one event of `model`.
pub fn price(
    model: &str,
    usage: &Usage,
    tenant: Option<&Price>,
    platform: Option<&Price>,
    upstream: Option<&Price>,
) -> Result<Priced, Unpriced> {
    let platform = platform.ok_or_else(|| Unpriced::NoPlatformPrice(model.to_owned()))?;
    Ok(Priced {
        cost: amount(usage, tenant.unwrap_or(platform)),
        platform_cost: amount(usage, platform),
        upstream_cost: upstream.map(|p| amount(usage, p)),
    })
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn p(input: &str, output: &str, cached: Option<&str>) -> Price {
        Price {
            input: d(input),
            output: d(output),
            cached_input: cached.map(d),
        }
    }

    #[test]
    fn cached_tokens_are_part_of_the_prompt_and_priced_at_the_cached_rate() {
        // The shape of the recorded `openai-chat-nonstream-cached` response: 4,020 prompt tokens of
        // which 4,012 cached, 4 completion tokens.
        let u = Usage {
            prompt_tokens: 4020,
            completion_tokens: 4,
            cached_input_tokens: 4012,
        };
        // 8 × 2.50 + 4012 × 1.25 + 4 × 10.00 = 5075 per million.
        assert_eq!(amount(&u, &p("2.50", "10.00", Some("1.25"))), d("0.005075"));
        // Without a cached price every prompt token pays the input price.
        assert_eq!(amount(&u, &p("2.50", "10.00", None)), d("0.010090"));
    }

    #[test]
    fn one_rounding_rule_half_away_from_zero_at_six_places() {
        let one = Usage {
            prompt_tokens: 1,
            ..Usage::default()
        };
        assert_eq!(
            amount(&one, &p("0.5", "0", None)),
            d("0.000001"),
            "0.0000005 rounds up"
        );
        assert_eq!(amount(&one, &p("0.49", "0", None)), d("0.000000"));
        // No binary floating point anywhere: 0.1 + 0.2 per million tokens is exactly 0.3.
        let m = Usage {
            prompt_tokens: 1_000_000,
            completion_tokens: 1_000_000,
            cached_input_tokens: 0,
        };
        assert_eq!(amount(&m, &p("0.1", "0.2", None)), d("0.3"));
    }

    #[test]
    fn three_prices_with_fallback_and_no_free_models() {
        let u = Usage {
            prompt_tokens: 1000,
            completion_tokens: 500,
            cached_input_tokens: 0,
        };
        let platform = p("3.00", "12.00", None);
        let tenant = p("4.00", "16.00", None);
        let upstream = p("2.50", "10.00", None);
        let priced = price(
            "gpt-4o",
            &u,
            Some(&tenant),
            Some(&platform),
            Some(&upstream),
        )
        .unwrap();
        assert_eq!(
            priced,
            Priced {
                cost: d("0.012"),
                platform_cost: d("0.009"),
                upstream_cost: Some(d("0.0075"))
            }
        );
        // A reseller without its own price charges the platform price; no channel cost is flagged.
        let fallback = price("gpt-4o", &u, None, Some(&platform), None).unwrap();
        assert_eq!((fallback.cost, fallback.upstream_cost), (d("0.009"), None));
        assert_eq!(
            price("mystery", &u, Some(&tenant), None, None),
            Err(Unpriced::NoPlatformPrice("mystery".into()))
        );
    }
}
