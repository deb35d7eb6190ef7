//! A `float8` sent to a `numeric` column in the binary format, as Postgres's own
//! `float8 → numeric` cast would make it.
//!
//! The staging merge inserts `cost_usd` and `saved_usd` (`float8` in the message) into their
//! `numeric(20, 12)` columns with an assignment cast: Postgres prints the float with 15
//! significant digits (`%.15g`, `float8_numeric`), reads that decimal, then rounds it to the
//! column's scale. The direct `COPY` into `records` must store the very same values, so
//! [`Numeric`] sends that 15-digit decimal and lets the column's type modifier round it
//! (`numeric_recv` applies it): both paths store equal numbers, which an integration test
//! checks value by value against Postgres.
//!
//! The binary `numeric` is `ndigits`, `weight`, `sign`, `dscale` (each 16 bits) and `ndigits`
//! base-10,000 digits, the first worth 10,000^`weight`.

use std::error::Error;

use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

const POSITIVE: u16 = 0x0000;
const NEGATIVE: u16 = 0x4000;
const NAN: u16 = 0xC000;
const INFINITY: u16 = 0xD000;
const NEGATIVE_INFINITY: u16 = 0xF000;

/// A float for a `numeric` column, converted like `float8::numeric`.
#[derive(Debug, Clone, Copy)]
pub struct Numeric(pub f64);

/// The binary `numeric` fields of a value.
#[derive(Debug, PartialEq, Eq)]
struct Fields {
    weight: i16,
    sign: u16,
    dscale: u16,
    digits: Vec<i16>,
}

impl Numeric {
    fn fields(self) -> Fields {
        let v = self.0;
        let special = |sign| Fields {
            weight: 0,
            sign,
            dscale: 0,
            digits: vec![],
        };
        if v.is_nan() {
            return special(NAN);
        }
        if v.is_infinite() {
            return special(if v > 0.0 { INFINITY } else { NEGATIVE_INFINITY });
        }
        if v == 0.0 {
            return special(POSITIVE);
        }
        // `%.15g`'s digits: 15 significant digits, correctly rounded (as glibc's printf),
        // then value = mantissa × 10^power.
        let text = format!("{:.14e}", v.abs());
        let (mantissa, exponent) = text
            .split_once('e')
            .expect("`e` formatting has an exponent");
        let exponent: i32 = exponent
            .parse()
            .expect("`e` formatting has an integer exponent");
        let mut decimal: Vec<u8> = mantissa
            .bytes()
            .filter(u8::is_ascii_digit)
            .map(|b| b - b'0')
            .collect();
        let mut power = exponent - (decimal.len() as i32 - 1);
        while decimal.len() > 1 && decimal.last() == Some(&0) {
            decimal.pop();
            power += 1;
        }
        // Decimal digit i (from the left) is worth 10^k, k = power + (len - 1 - i); it lands
        // in base-10,000 group floor(k / 4) at position k mod 4.
        let top = power + decimal.len() as i32 - 1;
        let (high, low) = (top.div_euclid(4), power.div_euclid(4));
        let mut digits = vec![0i16; (high - low + 1) as usize];
        for (i, d) in decimal.iter().enumerate() {
            let k = top - i as i32;
            let group = (high - k.div_euclid(4)) as usize;
            digits[group] += i16::from(*d) * 10i16.pow(k.rem_euclid(4) as u32);
        }
        while digits.last() == Some(&0) {
            digits.pop();
        }
        Fields {
            weight: high as i16,
            sign: if v < 0.0 { NEGATIVE } else { POSITIVE },
            dscale: (-power).max(0) as u16,
            digits,
        }
    }
}

impl ToSql for Numeric {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        let f = self.fields();
        out.put_i16(f.digits.len() as i16);
        out.put_i16(f.weight);
        out.put_u16(f.sign);
        out.put_u16(f.dscale);
        for d in f.digits {
            out.put_i16(d);
        }
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: f64) -> (i16, u16, u16, Vec<i16>) {
        let f = Numeric(v).fields();
        (f.weight, f.sign, f.dscale, f.digits)
    }

    #[test]
    fn values_are_postgres_base_10000_digits_of_the_15_digit_decimal() {
        // 0.000025 = 2500 × 10,000^-2, six decimals.
        assert_eq!(fields(0.000_025), (-2, POSITIVE, 6, vec![2500]));
        assert_eq!(fields(1.0), (0, POSITIVE, 0, vec![1]));
        assert_eq!(fields(12_345.678), (1, POSITIVE, 3, vec![1, 2345, 6780]));
        assert_eq!(fields(-10_000.0), (1, NEGATIVE, 0, vec![1]));
        assert_eq!(fields(100.5), (0, POSITIVE, 1, vec![100, 5000]));
        // 0.1 + 0.2 is 0.30000000000000004: 15 digits say 0.3.
        assert_eq!(fields(0.1 + 0.2), (-1, POSITIVE, 1, vec![3000]));
        // 15 significant digits, rounded: 1/3.
        assert_eq!(
            fields(1.0 / 3.0),
            (-1, POSITIVE, 15, vec![3333, 3333, 3333, 3330])
        );
        assert_eq!(fields(1e-13), (-4, POSITIVE, 13, vec![1000]));
        assert_eq!(fields(1e20), (5, POSITIVE, 0, vec![1]));
    }

    #[test]
    fn zero_and_the_special_values() {
        assert_eq!(fields(0.0), (0, POSITIVE, 0, vec![]));
        assert_eq!(fields(-0.0), (0, POSITIVE, 0, vec![]));
        assert_eq!(fields(f64::NAN).1, NAN);
        assert_eq!(fields(f64::INFINITY).1, INFINITY);
        assert_eq!(fields(f64::NEG_INFINITY).1, NEGATIVE_INFINITY);
    }

    #[test]
    fn the_wire_format_is_header_then_digits() {
        let mut out = BytesMut::new();
        Numeric(-0.5).to_sql(&Type::NUMERIC, &mut out).unwrap();
        assert_eq!(&out[..], &[0, 1, 255, 255, 0x40, 0, 0, 1, 0x13, 0x88]);
    }
}
