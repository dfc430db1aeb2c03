//! A fixed, seedless 64-bit hash for placement decisions.
//!
//! Placement must be the same in every process, across restarts and reloads
//! (sozu: "reproducible across workers and across process restarts"), so no
//! per-process random seed (`std`'s `RandomState`) may enter it. FNV-1a spreads
//! the bytes; the SplitMix64 finaliser then mixes the result so that keys that
//! differ in one byte land far apart.

pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// SplitMix64's finaliser.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_values_never_change() {
        // Changing these would remap every consistent-hash key of every deployment.
        assert_eq!(hash64(b""), 0xf52a_15e9_a9b5_e89b);
        assert_eq!(hash64(b"10.0.0.1:80"), 0xdbbc_907f_2153_1a73);
        assert_ne!(hash64(b"a"), hash64(b"b"));
    }
}
