//! RSA private key generation, producing PKCS#8 DER.
//!
//! This module owns the generation of RSA private keys (2048, 3072 or 4096 bits) and their
//! encoding as PKCS#8 DER. It exists because ring, meshca's one crypto provider, loads RSA keys
//! and signs with them but cannot generate them. The method is that of FIPS 186-5 appendix B.3.3
//! with e = 65537: each prime is a fresh random number of half the modulus size from ring's
//! `SystemRandom`, odd and with its top two bits set (a subrange of B.3.3's, so that n has
//! exactly the requested size); candidates divisible by one of the first 2,000 odd primes, or
//! with gcd(e, p − 1) ≠ 1, are dropped before the Miller–Rabin rounds, whose bases are random in
//! [2, p − 2] and whose count comes from FIPS 186-5 table B.1 at the error probability matching
//! the key's security strength (5 rounds for 2048-bit keys, 2^-112; 4 for 3072, 2^-128; 4 for
//! 4096, 2^-144; all better than 2^-100). q is drawn again until |p − q| > 2^(bits/2 − 100),
//! d = e^-1 mod lcm(p − 1, q − 1), and both primes are drawn again in the (negligibly rare) case
//! d ≤ 2^(bits/2). Every key is loaded by ring's `RsaKeyPair::from_pkcs8`, which validates the
//! consistency of its components, and must pass a sign/verify round trip before it is returned:
//! a key that fails is never returned. The arithmetic is not constant-time: it is meant for keys
//! generated on the host that uses them, not on a shared service that generates keys for others.

use std::cmp::Ordering;
use std::sync::OnceLock;

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{RsaKeyPair, UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256};

/// Why no RSA key could be generated.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Only 2048, 3072 and 4096 bits are generated.
    #[error("unsupported RSA key size {0}; use 2048, 3072 or 4096")]
    UnsupportedSize(u32),
    /// The system random number generator failed.
    #[error("random number generator failed")]
    Rng,
    /// The key failed a consistency check (an internal fault); no key is returned.
    #[error("generated key failed validation: {0}")]
    Invalid(String),
}

/// The public exponent.
const E: u64 = 65_537;

/// Generates an RSA key of `bits` (2048, 3072 or 4096) and returns it as PKCS#8 DER
/// (PrivateKeyInfo with rsaEncryption + NULL params wrapping a PKCS#1 RSAPrivateKey: version 0,
/// n, e, d, p, q, dp, dq, qinv).
///
/// CPU-bound for milliseconds to seconds (longer for larger keys, and several times longer in
/// unoptimized builds): on an async runtime, call it from a blocking context such as
/// `tokio::task::spawn_blocking`.
pub fn generate_pkcs8(bits: u32) -> Result<Vec<u8>, Error> {
    // Miller–Rabin rounds for primes of bits/2 bits: FIPS 186-5 table B.1, M-R tests only.
    let rounds = match bits {
        2048 => 5,
        3072 | 4096 => 4,
        _ => return Err(Error::UnsupportedSize(bits)),
    };
    let half = bits as usize / 2;
    let rng = SystemRandom::new();
    loop {
        let p = random_prime(half, rounds, &rng)?;
        let q = loop {
            let q = random_prime(half, rounds, &rng)?;
            if far_apart(&p, &q, half) {
                break q;
            }
        };
        // By convention p > q; qinv = q^-1 mod p either way.
        let (p, q) = if cmp(&p, &q) == Ordering::Less { (q, p) } else { (p, q) };
        if let Some(der) = assemble(&p, &q, bits as usize)? {
            self_check(&der, &rng)?;
            return Ok(der);
        }
    }
}

/// |p − q| > 2^(half − 100), for primes of `half` bits.
fn far_apart(p: &[u64], q: &[u64], half: usize) -> bool {
    let diff = if cmp(p, q) == Ordering::Less { sub(q, p) } else { sub(p, q) };
    cmp(&diff, &shl(&[1], half - 100)) == Ordering::Greater
}

/// Computes the private key from two distinct primes; `None` if d ≤ 2^(bits/2) (draw again).
fn assemble(p: &[u64], q: &[u64], bits: usize) -> Result<Option<Vec<u8>>, Error> {
    let invalid = |what: &str| Error::Invalid(what.to_string());
    let n = mul(p, q);
    if bit_len(&n) != bits {
        return Err(invalid("modulus has the wrong size"));
    }
    let (p1, q1) = (sub(p, &[1]), sub(q, &[1]));
    let lambda = divmod(&mul(&p1, &q1), &gcd(&p1, &q1)).0;
    let d = modinv(&[E], &lambda).ok_or_else(|| invalid("e is not invertible"))?;
    if bit_len(&d) <= bits / 2 {
        return Ok(None);
    }
    if divmod(&mul(&d, &[E]), &lambda).1 != [1] {
        return Err(invalid("e*d is not 1 mod lcm(p-1, q-1)"));
    }
    let qinv = modinv(q, p).ok_or_else(|| invalid("q is not invertible mod p"))?;
    let (dp, dq) = (divmod(&d, &p1).1, divmod(&d, &q1).1);

    let mut rsa_key = der_uint(&[]);
    let fields: [&[u64]; 8] = [&n, &[E], &d, p, q, &dp, &dq, &qinv];
    for v in fields {
        rsa_key.extend(der_uint(v));
    }
    let rsa_key = der_tlv(0x30, &rsa_key);
    // AlgorithmIdentifier { rsaEncryption (1.2.840.113549.1.1.1), NULL }.
    const RSA_ALGORITHM: [u8; 15] =
        [0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];
    let mut info = der_uint(&[]);
    info.extend(RSA_ALGORITHM);
    info.extend(der_tlv(0x04, &rsa_key));
    Ok(Some(der_tlv(0x30, &info)))
}

/// Loads the key in ring and signs and verifies a fixed message with it.
fn self_check(der: &[u8], rng: &SystemRandom) -> Result<(), Error> {
    const MESSAGE: &[u8] = b"meshca RSA key self-check";
    let key = RsaKeyPair::from_pkcs8(der).map_err(|e| Error::Invalid(format!("ring rejected it: {e}")))?;
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(&RSA_PKCS1_SHA256, rng, MESSAGE, &mut signature)
        .map_err(|_| Error::Invalid("signing failed".to_string()))?;
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key.public().as_ref())
        .verify(MESSAGE, &signature)
        .map_err(|_| Error::Invalid("its signature does not verify".to_string()))
}

// ---- DER ----

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    if content.len() < 0x80 {
        out.push(content.len() as u8);
    } else {
        let len = content.len().to_be_bytes();
        let len = &len[len.iter().take_while(|&&b| b == 0).count()..];
        out.push(0x80 | len.len() as u8);
        out.extend(len);
    }
    out.extend(content);
    out
}

/// A non-negative INTEGER: minimal, with a leading 0x00 when the top bit is set.
fn der_uint(a: &[u64]) -> Vec<u8> {
    let mut content = to_be_bytes(a);
    if content.first().is_none_or(|&b| b & 0x80 != 0) {
        content.insert(0, 0);
    }
    der_tlv(0x02, &content)
}

// ---- Primes ----

/// The first 2,000 odd primes (3 to 17,393), in groups whose product fits in a u64.
fn small_prime_groups() -> &'static [(u64, Vec<u64>)] {
    static GROUPS: OnceLock<Vec<(u64, Vec<u64>)>> = OnceLock::new();
    GROUPS.get_or_init(|| {
        const LIMIT: usize = 17_394;
        let mut composite = vec![false; LIMIT];
        let mut groups: Vec<(u64, Vec<u64>)> = Vec::new();
        for i in (3..LIMIT).step_by(2) {
            if composite[i] {
                continue;
            }
            (i * i..LIMIT).step_by(i).for_each(|j| composite[j] = true);
            let p = i as u64;
            match groups.last_mut() {
                Some((product, ps)) if product.checked_mul(p).is_some() => {
                    *product *= p;
                    ps.push(p);
                }
                _ => groups.push((p, vec![p])),
            }
        }
        groups
    })
}

/// A random prime of exactly `bits` bits (a multiple of 64) with its top two bits set and
/// p mod e ≠ 1, i.e. gcd(e, p − 1) = 1 (e is prime).
fn random_prime(bits: usize, rounds: usize, rng: &dyn SecureRandom) -> Result<Vec<u64>, Error> {
    loop {
        let mut w = random_bits(bits, rng)?;
        w[0] |= 1;
        w[bits / 64 - 1] |= 0b11 << 62;
        if rem_u64(&w, E) != 1 && is_probable_prime(&w, rounds, rng)? {
            return Ok(w);
        }
    }
}

/// A uniformly random number below 2^`bits`, as ⌈bits/64⌉ limbs (not normalized).
fn random_bits(bits: usize, rng: &dyn SecureRandom) -> Result<Vec<u64>, Error> {
    let mut bytes = vec![0u8; bits.div_ceil(64) * 8];
    rng.fill(&mut bytes).map_err(|_| Error::Rng)?;
    let mut w: Vec<u64> =
        bytes.chunks_exact(8).map(|c| c.iter().fold(0, |l, &b| l << 8 | b as u64)).collect();
    if let Some(top) = w.last_mut().filter(|_| !bits.is_multiple_of(64)) {
        *top &= (1 << (bits % 64)) - 1;
    }
    Ok(w)
}

/// Trial division by the small primes, then `rounds` Miller–Rabin rounds with random bases.
fn is_probable_prime(w: &[u64], rounds: usize, rng: &dyn SecureRandom) -> Result<bool, Error> {
    let w = trim(w);
    match w {
        [] | [0 | 1] => return Ok(false),
        [2] => return Ok(true),
        _ if w[0].is_multiple_of(2) => return Ok(false),
        _ => {}
    }
    for (product, primes) in small_prime_groups() {
        let r = rem_u64(w, *product);
        if let Some(&p) = primes.iter().find(|&&p| r.is_multiple_of(p)) {
            return Ok(w == [p]);
        }
    }
    let w1 = sub(w, &[1]);
    let mont = Mont::new(w);
    let (one, minus_one) = (mont.to_mont(&[1]), mont.to_mont(&w1));
    let s = (0..bit_len(&w1)).find(|&i| w1[i / 64] >> (i % 64) & 1 == 1).unwrap_or(0);
    let m = shr(&w1, s);
    let mut done = 0;
    while done < rounds {
        let b = random_bits(bit_len(w), rng)?;
        if cmp(&b, &[2]) == Ordering::Less || cmp(&b, &w1) != Ordering::Less {
            continue;
        }
        done += 1;
        if !strong_probable_prime(&mont, &m, s, &one, &minus_one, &b) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// One Miller–Rabin round: does base `b` find w = 2^s·m + 1 a strong probable prime?
fn strong_probable_prime(
    mont: &Mont,
    m: &[u64],
    s: usize,
    one: &[u64],
    minus_one: &[u64],
    b: &[u64],
) -> bool {
    let mut z = mont.pow(&mont.to_mont(b), m);
    if z == one || z == minus_one {
        return true;
    }
    for _ in 1..s {
        z = mont.mul(&z, &z);
        if z == minus_one {
            return true;
        }
        if z == one {
            return false;
        }
    }
    false
}

// ---- Unsigned big integers: little-endian u64 limbs ----

/// `a` without its high zero limbs.
fn trim(a: &[u64]) -> &[u64] {
    &a[..a.iter().rposition(|&l| l != 0).map_or(0, |i| i + 1)]
}

fn norm(mut a: Vec<u64>) -> Vec<u64> {
    a.truncate(trim(&a).len());
    a
}

fn bit_len(a: &[u64]) -> usize {
    let a = trim(a);
    a.last().map_or(0, |top| a.len() * 64 - top.leading_zeros() as usize)
}

fn cmp(a: &[u64], b: &[u64]) -> Ordering {
    let (a, b) = (trim(a), trim(b));
    a.len().cmp(&b.len()).then_with(|| a.iter().rev().cmp(b.iter().rev()))
}

fn add(a: &[u64], b: &[u64]) -> Vec<u64> {
    let (a, b) = if a.len() < b.len() { (b, a) } else { (a, b) };
    let mut out = Vec::with_capacity(a.len() + 1);
    let mut carry = false;
    for (i, &x) in a.iter().enumerate() {
        let (s, c1) = x.overflowing_add(b.get(i).copied().unwrap_or(0));
        let (s, c2) = s.overflowing_add(carry as u64);
        out.push(s);
        carry = c1 || c2;
    }
    out.push(carry as u64);
    norm(out)
}

/// a − b in place; requires a ≥ b.
fn sub_assign(a: &mut [u64], b: &[u64]) {
    let mut borrow = false;
    for (i, x) in a.iter_mut().enumerate() {
        let (s, b1) = x.overflowing_sub(b.get(i).copied().unwrap_or(0));
        let (s, b2) = s.overflowing_sub(borrow as u64);
        *x = s;
        borrow = b1 || b2;
    }
    debug_assert!(!borrow, "sub underflow");
}

/// a − b; requires a ≥ b.
fn sub(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = a.to_vec();
    sub_assign(&mut out, b);
    norm(out)
}

fn mul(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = vec![0u64; a.len() + b.len()];
    for (i, &x) in a.iter().enumerate() {
        let mut carry = 0u64;
        for (j, &y) in b.iter().enumerate() {
            let t = out[i + j] as u128 + x as u128 * y as u128 + carry as u128;
            out[i + j] = t as u64;
            carry = (t >> 64) as u64;
        }
        out[i + b.len()] = carry;
    }
    norm(out)
}

fn shl(a: &[u64], n: usize) -> Vec<u64> {
    let (limbs, bits) = (n / 64, n % 64);
    let mut out = vec![0u64; limbs];
    let mut carry = 0u64;
    for &x in a {
        out.push(x << bits | carry);
        carry = if bits == 0 { 0 } else { x >> (64 - bits) };
    }
    out.push(carry);
    norm(out)
}

fn shr(a: &[u64], n: usize) -> Vec<u64> {
    let (limbs, bits) = (n / 64, n % 64);
    let a = a.get(limbs..).unwrap_or(&[]);
    let out = (0..a.len())
        .map(|i| {
            let hi = if bits == 0 { 0 } else { a.get(i + 1).map_or(0, |&h| h << (64 - bits)) };
            a[i] >> bits | hi
        })
        .collect();
    norm(out)
}

/// (a / b, a mod b) by binary long division; b must not be zero.
fn divmod(a: &[u64], b: &[u64]) -> (Vec<u64>, Vec<u64>) {
    assert!(!trim(b).is_empty(), "division by zero");
    let (a_bits, b_bits) = (bit_len(a), bit_len(b));
    let mut r = norm(a.to_vec());
    if a_bits < b_bits {
        return (Vec::new(), r);
    }
    let shift = a_bits - b_bits;
    let mut q = vec![0u64; shift / 64 + 1];
    let mut d = shl(b, shift);
    for i in (0..=shift).rev() {
        if cmp(&r, &d) != Ordering::Less {
            sub_assign(&mut r, &d);
            q[i / 64] |= 1 << (i % 64);
        }
        d = shr(&d, 1);
    }
    (norm(q), norm(r))
}

fn rem_u64(a: &[u64], m: u64) -> u64 {
    a.iter().rev().fold(0u64, |r, &l| ((((r as u128) << 64) | l as u128) % m as u128) as u64)
}

fn gcd(a: &[u64], b: &[u64]) -> Vec<u64> {
    let (mut a, mut b) = (norm(a.to_vec()), norm(b.to_vec()));
    while !b.is_empty() {
        let r = divmod(&a, &b).1;
        (a, b) = (b, r);
    }
    a
}

/// a^-1 mod m (m > 1) by the extended Euclidean algorithm, or `None` if gcd(a, m) ≠ 1.
/// Invariant: r_i ≡ s_i·a (mod m), with s_i kept as (negative, magnitude).
fn modinv(a: &[u64], m: &[u64]) -> Option<Vec<u64>> {
    let (mut r0, mut r1) = (norm(m.to_vec()), divmod(a, m).1);
    let (mut s0, mut s1): ((bool, Vec<u64>), (bool, Vec<u64>)) = ((false, Vec::new()), (false, vec![1]));
    while !r1.is_empty() {
        let (q, r2) = divmod(&r0, &r1);
        // s2 = s0 − q·s1
        let qs1 = (s1.0, mul(&q, &s1.1));
        let s2 = if s0.0 != qs1.0 {
            (s0.0, add(&s0.1, &qs1.1))
        } else if cmp(&s0.1, &qs1.1) != Ordering::Less {
            (s0.0, sub(&s0.1, &qs1.1))
        } else {
            (!s0.0, sub(&qs1.1, &s0.1))
        };
        (r0, r1, s0, s1) = (r1, r2, s1, s2);
    }
    if r0 != [1] {
        return None;
    }
    let s = divmod(&s0.1, m).1;
    Some(if s0.0 && !s.is_empty() { sub(m, &s) } else { s })
}

fn to_be_bytes(a: &[u64]) -> Vec<u8> {
    let bytes: Vec<u8> = trim(a).iter().rev().flat_map(|l| l.to_be_bytes()).collect();
    bytes.into_iter().skip_while(|&b| b == 0).collect()
}

#[cfg(test)]
fn from_be_bytes(bytes: &[u8]) -> Vec<u64> {
    norm(bytes.rchunks(8).map(|c| c.iter().fold(0, |l, &b| l << 8 | b as u64)).collect())
}

/// Montgomery arithmetic modulo an odd n > 1, on fixed-length residues of n.len() limbs.
struct Mont {
    n: Vec<u64>,
    /// −n^-1 mod 2^64.
    n0: u64,
    /// R² mod n, R = 2^(64·len).
    rr: Vec<u64>,
}

impl Mont {
    fn new(n: &[u64]) -> Mont {
        let n = trim(n).to_vec();
        debug_assert!(n.first().is_some_and(|&l| l % 2 == 1) && cmp(&n, &[1]) == Ordering::Greater);
        // Newton's iteration doubles the correct low bits of n[0]^-1: 1, 2, 4, …, 64.
        let mut inv = 1u64;
        for _ in 0..6 {
            inv = inv.wrapping_mul(2u64.wrapping_sub(n[0].wrapping_mul(inv)));
        }
        let rr = divmod(&shl(&[1], 128 * n.len()), &n).1;
        let mut mont = Mont { n0: inv.wrapping_neg(), rr: Vec::new(), n };
        mont.rr = mont.pad(rr);
        mont
    }

    fn pad(&self, mut a: Vec<u64>) -> Vec<u64> {
        a.resize(self.n.len(), 0);
        a
    }

    /// a·b·R^-1 mod n, for a, b < n (coarsely integrated operand scanning).
    fn mul(&self, a: &[u64], b: &[u64]) -> Vec<u64> {
        let (n, k) = (&self.n, self.n.len());
        let mut t = vec![0u64; k + 2];
        for &ai in a {
            let mut c = 0u64;
            for (tj, &bj) in t.iter_mut().zip(b) {
                let s = *tj as u128 + ai as u128 * bj as u128 + c as u128;
                (*tj, c) = (s as u64, (s >> 64) as u64);
            }
            let s = t[k] as u128 + c as u128;
            (t[k], t[k + 1]) = (s as u64, (s >> 64) as u64);
            let m = t[0].wrapping_mul(self.n0);
            let mut c = ((t[0] as u128 + m as u128 * n[0] as u128) >> 64) as u64;
            for j in 1..k {
                let s = t[j] as u128 + m as u128 * n[j] as u128 + c as u128;
                (t[j - 1], c) = (s as u64, (s >> 64) as u64);
            }
            let s = t[k] as u128 + c as u128;
            (t[k - 1], t[k], t[k + 1]) = (s as u64, t[k + 1] + (s >> 64) as u64, 0);
        }
        t.truncate(k + 1);
        if cmp(&t, n) != Ordering::Less {
            sub_assign(&mut t, n);
        }
        t.truncate(k);
        t
    }

    fn to_mont(&self, a: &[u64]) -> Vec<u64> {
        let a = self.pad(divmod(a, &self.n).1);
        self.mul(&a, &self.rr)
    }

    #[cfg(test)]
    fn to_plain(&self, a: &[u64]) -> Vec<u64> {
        norm(self.mul(a, &self.pad(vec![1])))
    }

    /// base^e for `base` in Montgomery form, result in Montgomery form (4-bit fixed window).
    fn pow(&self, base: &[u64], e: &[u64]) -> Vec<u64> {
        let mut table = vec![self.to_mont(&[1])];
        for i in 1..16 {
            table.push(self.mul(&table[i - 1], base));
        }
        let mut acc = table[0].clone();
        for i in (0..bit_len(e).div_ceil(4)).rev() {
            for _ in 0..4 {
                acc = self.mul(&acc, &acc);
            }
            let window = (e[i / 16] >> (4 * (i % 16))) & 0xf;
            if window != 0 {
                acc = self.mul(&acc, &table[window as usize]);
            }
        }
        acc
    }
}

/// base^e mod n for odd n > 1.
#[cfg(test)]
fn modpow(base: &[u64], e: &[u64], n: &[u64]) -> Vec<u64> {
    let mont = Mont::new(n);
    mont.to_plain(&mont.pow(&mont.to_mont(base), e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;
    use ring::rand::SystemRandom;

    /// Reproducible test values (splitmix64).
    struct Values(u64);

    impl Values {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        /// A value of 1 to 64 random bits.
        fn sized(&mut self) -> u64 {
            let bits = self.next() % 64 + 1;
            self.next() >> (64 - bits)
        }
        fn limbs(&mut self, n: usize) -> Vec<u64> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    fn big(x: u128) -> Vec<u64> {
        norm(vec![x as u64, (x >> 64) as u64])
    }

    fn mulmod(a: u128, b: u128, m: u128) -> u128 {
        // a, b < m < 2^64, so a·b fits in a u128.
        a * b % m
    }

    fn powmod(mut b: u128, mut e: u64, m: u128) -> u128 {
        let mut acc = 1 % m;
        b %= m;
        while e > 0 {
            if e & 1 == 1 {
                acc = mulmod(acc, b, m);
            }
            b = mulmod(b, b, m);
            e >>= 1;
        }
        acc
    }

    fn gcd128(mut a: u128, mut b: u128) -> u128 {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    }

    fn mersenne(p: usize) -> Vec<u64> {
        sub(&shl(&[1], p), &[1])
    }

    fn probable_prime(w: &[u64]) -> bool {
        is_probable_prime(w, 20, &SystemRandom::new()).unwrap()
    }

    #[test]
    fn arithmetic_matches_u128_arithmetic_for_small_values() {
        let mut v = Values(1);
        for _ in 0..1000 {
            let (a, b) = (v.sized() as u128, v.sized().max(1) as u128);
            let (x, y) = (((v.next() as u128) << 64) | v.next() as u128, v.sized().max(1) as u128);
            assert_eq!(add(&big(a), &big(b)), big(a + b));
            assert_eq!(sub(&big(a.max(b)), &big(a.min(b))), big(a.max(b) - a.min(b)));
            assert_eq!(mul(&big(a), &big(b)), big(a * b));
            assert_eq!(cmp(&big(a), &big(b)), a.cmp(&b));
            assert_eq!(divmod(&big(x), &big(y)), (big(x / y), big(x % y)));
            assert_eq!(rem_u64(&big(x), y as u64), (x % y) as u64);
            assert_eq!(gcd(&big(a), &big(b)), big(gcd128(a, b)));
            let s = (v.next() % 64) as usize;
            assert_eq!(shl(&big(a), s), big(a << s));
            assert_eq!(shr(&big(x), s), big(x >> s));
            assert_eq!(bit_len(&big(x)), 128 - x.leading_zeros() as usize);
        }
    }

    #[test]
    fn modpow_matches_u128_arithmetic_for_small_values() {
        let mut v = Values(2);
        for _ in 0..1000 {
            let m = (v.sized() | 1).max(3) as u128;
            let (b, e) = (v.next() as u128, v.sized());
            assert_eq!(modpow(&big(b), &big(e as u128), &big(m)), big(powmod(b, e, m)), "{b}^{e} mod {m}");
        }
        assert_eq!(modpow(&[5], &[], &[7]), [1]);
        assert_eq!(modpow(&[0], &[3], &[7]), Vec::<u64>::new());
    }

    #[test]
    fn modinv_matches_u128_arithmetic_for_small_values() {
        let mut v = Values(3);
        for _ in 0..1000 {
            let m = v.sized().max(2) as u128;
            let a = v.sized() as u128;
            match modinv(&big(a), &big(m)) {
                Some(inv) => {
                    let inv = inv.iter().rev().fold(0u128, |acc, &l| (acc << 64) | l as u128);
                    assert!(inv < m);
                    assert_eq!(mulmod(a % m, inv, m), 1 % m, "{a}^-1 mod {m}");
                }
                None => assert_ne!(gcd128(a, m), 1, "{a} mod {m} has an inverse"),
            }
        }
        assert_eq!(modinv(&[3], &[7]), Some(vec![5]));
        assert_eq!(modinv(&[6], &[9]), None);
    }

    #[test]
    fn division_and_montgomery_arithmetic_agree_on_multi_limb_values() {
        let mut v = Values(4);
        for _ in 0..300 {
            let (la, lb) = ((v.next() % 34) as usize, (v.next() % 17 + 1) as usize);
            let a = norm(v.limbs(la));
            let mut b = v.limbs(lb);
            b[0] |= 1;
            let b = norm(b);
            if b == [1] {
                continue;
            }
            let (q, r) = divmod(&a, &b);
            assert_eq!(add(&mul(&q, &b), &r), a);
            assert_eq!(cmp(&r, &b), Ordering::Less);

            let mont = Mont::new(&b);
            let (x, y) = (divmod(&v.limbs(lb), &b).1, r);
            let product = mont.to_plain(&mont.mul(&mont.to_mont(&x), &mont.to_mont(&y)));
            assert_eq!(product, divmod(&mul(&x, &y), &b).1);
            let cube = divmod(&mul(&mul(&x, &x), &x), &b).1;
            assert_eq!(modpow(&x, &[3], &b), cube);
        }
    }

    #[test]
    fn bytes_convert_both_ways() {
        let mut v = Values(5);
        for n in 0..40 {
            let a = norm(v.limbs(n % 9));
            let bytes = to_be_bytes(&a);
            assert!(bytes.first() != Some(&0));
            assert_eq!(from_be_bytes(&bytes), a);
        }
        assert_eq!(to_be_bytes(&[0x0102]), [1, 2]);
        assert_eq!(from_be_bytes(&[0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]), [0x0203_0405_0607_0809, 1]);
    }

    #[test]
    fn der_integers_are_minimal_and_positive() {
        assert_eq!(der_uint(&[]), [2, 1, 0]);
        assert_eq!(der_uint(&[0x7f]), [2, 1, 0x7f]);
        assert_eq!(der_uint(&[0x80]), [2, 2, 0, 0x80]);
        assert_eq!(der_uint(&[0x0100]), [2, 2, 1, 0]);
        assert_eq!(der_tlv(4, &[7; 0x80])[..3], [4, 0x81, 0x80]);
        assert_eq!(der_tlv(4, &[7; 0x1234])[..4], [4, 0x82, 0x12, 0x34]);
    }

    #[test]
    fn the_small_prime_table_holds_the_first_2000_odd_primes() {
        let primes: Vec<u64> = small_prime_groups().iter().flat_map(|(_, ps)| ps.clone()).collect();
        assert_eq!(primes.len(), 2000);
        assert_eq!(primes[..5], [3, 5, 7, 11, 13]);
        assert_eq!(primes.last(), Some(&17_393));
        for (product, ps) in small_prime_groups() {
            assert_eq!(ps.iter().product::<u64>(), *product);
        }
    }

    #[test]
    fn small_numbers_are_classified_as_trial_division_does() {
        let is_prime = |n: u64| n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d));
        for n in 0..40_000u64 {
            assert_eq!(probable_prime(&[n]), is_prime(n), "{n}");
        }
    }

    #[test]
    fn carmichael_numbers_and_strong_pseudoprimes_are_composite() {
        // Carmichael numbers with small factors: trial division finds them.
        for n in [561u64, 41_041, 825_265, 321_197_185, 5_394_826_801, 232_250_619_601] {
            assert!(!probable_prime(&[n]), "{n}");
        }
        // Carmichael numbers whose factors all escape trial division: Fermat's test is fooled by
        // every base, Miller–Rabin is not.
        for n in [18_121u64 * 36_241 * 54_361, 18_451 * 36_901 * 55_351] {
            assert_eq!(modpow(&[2], &[n - 1], &[n]), [1]);
            assert!(!probable_prime(&[n]), "{n}");
        }
        // One round with a fixed base.
        let sprp = |w: u64, base: u64| {
            let (mont, s) = (Mont::new(&[w]), (w - 1).trailing_zeros() as usize);
            let (one, minus_one) = (mont.to_mont(&[1]), mont.to_mont(&[w - 1]));
            strong_probable_prime(&mont, &[(w - 1) >> s], s, &one, &minus_one, &[base])
        };
        assert!(!sprp(561, 2));
        assert!(sprp(2047, 2) && !sprp(2047, 3));
        // 3,215,031,751 = 151·751·28351 is a strong probable prime to bases 2, 3, 5 and 7, not 11.
        assert!([2, 3, 5, 7].iter().all(|&b| sprp(3_215_031_751, b)) && !sprp(3_215_031_751, 11));
        assert!(sprp(1_000_003, 2) && sprp(1_000_003, 999_999));
        // 2^128 + 1 = 59649589127497217 · 5704689200685129054721; products of Mersenne primes.
        assert!(!probable_prime(&add(&shl(&[1], 128), &[1])));
        assert!(!probable_prime(&mul(&mersenne(61), &mersenne(89))));
        assert!(!probable_prime(&mul(&mersenne(521), &mersenne(607))));
    }

    #[test]
    fn mersenne_primes_are_prime() {
        for p in [61, 89, 107, 127, 521, 607, 1279] {
            assert!(probable_prime(&mersenne(p)), "2^{p} - 1");
        }
        assert!(!probable_prime(&mersenne(67)));
        assert!(!probable_prime(&mersenne(1277)));
    }

    /// Reads one DER TLV off the front of `input`.
    fn read_tlv<'a>(input: &mut &'a [u8]) -> (u8, &'a [u8]) {
        let (tag, first) = (input[0], input[1] as usize);
        let (len, header) = if first < 0x80 {
            (first, 2)
        } else {
            let n = first & 0x7f;
            (input[2..2 + n].iter().fold(0, |l, &b| l << 8 | b as usize), 2 + n)
        };
        let content = &input[header..header + len];
        *input = &input[header + len..];
        (tag, content)
    }

    /// The nine integers of the RSAPrivateKey inside a PKCS#8 PrivateKeyInfo, checking the wrapper.
    fn parse(der: &[u8]) -> Vec<Vec<u64>> {
        let mut input = der;
        let (tag, mut info) = read_tlv(&mut input);
        assert_eq!((tag, input.len()), (0x30, 0));
        assert_eq!(read_tlv(&mut info), (0x02, &[0u8][..]));
        assert_eq!(read_tlv(&mut info), (0x30, &[6, 9, 0x2a, 0x86, 0x48, 0x86, 0xf7, 13, 1, 1, 1, 5, 0][..]));
        let (tag, mut octets) = read_tlv(&mut info);
        assert_eq!((tag, info.len()), (0x04, 0));
        let (tag, mut key) = read_tlv(&mut octets);
        assert_eq!((tag, octets.len()), (0x30, 0));
        let mut ints = Vec::new();
        while !key.is_empty() {
            let (tag, int) = read_tlv(&mut key);
            assert_eq!(tag, 0x02);
            assert!(
                int[0] & 0x80 == 0 && (int.len() == 1 || int[0] != 0 || int[1] & 0x80 != 0),
                "not minimal"
            );
            ints.push(from_be_bytes(int));
        }
        assert_eq!(ints.len(), 9);
        ints
    }

    fn assert_loads_and_signs_in_ring(der: &[u8], bits: usize) {
        let key = RsaKeyPair::from_pkcs8(der).unwrap();
        assert_eq!(key.public().modulus_len(), bits / 8);
        let message = b"a message";
        let mut signature = vec![0; key.public().modulus_len()];
        key.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), message, &mut signature).unwrap();
        let public = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key.public().as_ref());
        public.verify(message, &signature).unwrap();
        signature[10] ^= 1;
        assert!(public.verify(message, &signature).is_err());
    }

    /// n of exactly `bits` bits, e = 65537, n = p·q with p > q both prime and far apart, d and
    /// the CRT values consistent, every INTEGER minimal and positive.
    fn assert_well_formed(der: &[u8], bits: usize) {
        let [version, n, e, d, p, q, dp, dq, qinv] = parse(der).try_into().unwrap();
        assert_eq!(version, Vec::<u64>::new());
        assert_eq!(bit_len(&n), bits);
        assert_eq!(e, [65_537]);
        assert_eq!(mul(&p, &q), n);
        assert_eq!((bit_len(&p), bit_len(&q)), (bits / 2, bits / 2));
        assert_eq!(cmp(&p, &q), Ordering::Greater);
        assert_eq!(cmp(&sub(&p, &q), &shl(&[1], bits / 2 - 100)), Ordering::Greater, "|p - q| too small");
        assert!(probable_prime(&p) && probable_prime(&q));
        let (p1, q1) = (sub(&p, &[1]), sub(&q, &[1]));
        let lambda = divmod(&mul(&p1, &q1), &gcd(&p1, &q1)).0;
        assert_eq!(cmp(&d, &lambda), Ordering::Less);
        assert!(bit_len(&d) > bits / 2);
        assert_eq!(divmod(&mul(&d, &e), &lambda).1, [1]);
        assert_eq!(dp, divmod(&d, &p1).1);
        assert_eq!(dq, divmod(&d, &q1).1);
        assert_eq!(divmod(&mul(&qinv, &q), &p).1, [1]);
        assert_eq!(cmp(&qinv, &p), Ordering::Less);
    }

    #[test]
    fn a_generated_2048_bit_key_loads_in_ring_signs_and_is_well_formed() {
        let der = generate_pkcs8(2048).unwrap();
        assert_loads_and_signs_in_ring(&der, 2048);
        assert_well_formed(&der, 2048);
    }

    #[test]
    fn a_generated_3072_bit_key_loads_in_ring_signs_and_is_well_formed() {
        let der = generate_pkcs8(3072).unwrap();
        assert_loads_and_signs_in_ring(&der, 3072);
        assert_well_formed(&der, 3072);
    }

    #[test]
    #[cfg_attr(debug_assertions, ignore = "slow without optimizations")]
    fn a_generated_4096_bit_key_loads_in_ring_signs_and_is_well_formed() {
        let der = generate_pkcs8(4096).unwrap();
        assert_loads_and_signs_in_ring(&der, 4096);
        assert_well_formed(&der, 4096);
    }

    #[test]
    fn primes_closer_than_2_to_the_half_minus_100_are_refused() {
        let p = add(&shl(&[3], 1022), &[1]);
        let bound = shl(&[1], 924);
        assert!(!far_apart(&p, &p, 1024));
        assert!(!far_apart(&add(&p, &bound), &p, 1024));
        assert!(!far_apart(&p, &add(&p, &bound), 1024));
        assert!(far_apart(&add(&add(&p, &bound), &[2]), &p, 1024));
        assert!(far_apart(&p, &add(&add(&p, &bound), &[2]), 1024));
    }

    #[test]
    fn unsupported_sizes_are_refused() {
        for bits in [0, 512, 1024, 2047, 2049, 8192] {
            assert!(matches!(generate_pkcs8(bits), Err(Error::UnsupportedSize(b)) if b == bits), "{bits}");
        }
    }

    #[test]
    fn rcgen_loads_a_generated_key_and_signs_a_csr() {
        let der = generate_pkcs8(2048).unwrap();
        let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls_pki_types::PrivatePkcs8KeyDer::from(der),
            &rcgen::PKCS_RSA_SHA256,
        )
        .unwrap();
        let params = rcgen::CertificateParams::new(vec!["web.default.svc".to_string()]).unwrap();
        let csr = params.serialize_request(&key).unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_der(csr.der()).unwrap();
        assert_eq!(parsed.public_key.der_bytes(), key.der_bytes());

        // The request's self-signature verifies with the generated key.
        let mut input = &csr.der()[..];
        let (_, mut request) = read_tlv(&mut input);
        let info_start = request;
        read_tlv(&mut request);
        let info = &info_start[..info_start.len() - request.len()];
        read_tlv(&mut request);
        let (tag, signature) = read_tlv(&mut request);
        assert_eq!((tag, signature[0]), (0x03, 0));
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key.public_key_raw())
            .verify(info, &signature[1..])
            .unwrap();
    }
}
