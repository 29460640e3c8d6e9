//! The Merkle tree over the audit log's lines, as RFC 6962 §2.1 defines it (and
//! RFC 9162 §2.1 restates): leaf *i* is the log's *i*-th line without its line feed,
//! its hash `SHA-256(0x00 || line)`, an inner node `SHA-256(0x01 || left || right)`,
//! and a tree of *n* leaves splits at the largest power of two below *n*.
//!
//! [`Frontier`] is what the writer keeps: the roots of the perfect subtrees that
//! make up the tree so far (at most 64 hashes), enough to append a leaf and give
//! the root. [`Leaves`] holds every leaf hash of a log read back, for the tools: the
//! root at any size, inclusion proofs (an audit path) and consistency proofs, in
//! RFC 6962's order, and the checks of both ([`check_inclusion`], [`check_consistency`],
//! RFC 9162 §2.1.3.2 and §2.1.4.2). SHA-256 is ring's.

use ring::digest::{Context, SHA256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// `SHA-256(0x00 || line)`.
pub fn leaf_hash(line: &[u8]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0]);
    ctx.update(line);
    digest(ctx)
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[1]);
    ctx.update(left);
    ctx.update(right);
    digest(ctx)
}

/// The root of the empty tree: `SHA-256("")`.
pub fn empty_root() -> Hash {
    digest(Context::new(&SHA256))
}

fn digest(ctx: Context) -> Hash {
    let mut out = [0; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The largest power of two strictly below `n` (`n` ≥ 2).
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// The right edge of a tree: the roots of its perfect subtrees, largest first
/// (one per set bit of the size). Appending is one leaf hash and, amortised, one
/// node hash.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    subtrees: Vec<Hash>,
}

impl Frontier {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf by its hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut hash = leaf;
        // Each trailing one bit of the old size is a subtree of the new leaf's size to merge with.
        let mut size = self.size;
        while size & 1 == 1 {
            let left = self.subtrees.pop().unwrap_or_default();
            hash = node_hash(&left, &hash);
            size >>= 1;
        }
        self.subtrees.push(hash);
        self.size += 1;
    }

    /// The tree's root (RFC 6962's MTH).
    pub fn root(&self) -> Hash {
        let mut subtrees = self.subtrees.iter().rev();
        let Some(last) = subtrees.next() else { return empty_root() };
        subtrees.fold(*last, |right, left| node_hash(left, &right))
    }
}

/// Every leaf hash of a log, in order.
#[derive(Clone, Debug, Default)]
pub struct Leaves(pub Vec<Hash>);

impl Leaves {
    pub fn len(&self) -> u64 {
        self.0.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The root of the tree of the first `size` leaves (`size` ≤ len).
    pub fn root(&self, size: u64) -> Hash {
        let mut frontier = Frontier::default();
        for leaf in &self.0[..size as usize] {
            frontier.push(*leaf);
        }
        frontier.root()
    }

    /// MTH over leaves `[from, to)`.
    fn subtree(&self, from: u64, to: u64) -> Hash {
        match to - from {
            0 => empty_root(),
            1 => self.0[from as usize],
            n => {
                let k = split(n);
                node_hash(&self.subtree(from, from + k), &self.subtree(from + k, to))
            }
        }
    }

    /// The audit path of leaf `index` in the tree of the first `size` leaves
    /// (RFC 6962 §2.1.1 PATH), or `None` when `index` ≥ `size` or `size` > len.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Option<Vec<Hash>> {
        if index >= size || size > self.len() {
            return None;
        }
        let mut proof = Vec::new();
        self.path(index, 0, size, &mut proof);
        Some(proof)
    }

    fn path(&self, index: u64, from: u64, to: u64, proof: &mut Vec<Hash>) {
        let n = to - from;
        if n <= 1 {
            return;
        }
        let k = split(n);
        if index < from + k {
            self.path(index, from, from + k, proof);
            proof.push(self.subtree(from + k, to));
        } else {
            self.path(index, from + k, to, proof);
            proof.push(self.subtree(from, from + k));
        }
    }

    /// The consistency proof from the tree of `old` leaves to the tree of `new`
    /// (RFC 6962 §2.1.2 PROOF), or `None` unless 0 < `old` ≤ `new` ≤ len.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Option<Vec<Hash>> {
        if old == 0 || old > new || new > self.len() {
            return None;
        }
        let mut proof = Vec::new();
        self.subproof(old, 0, new, true, &mut proof);
        Some(proof)
    }

    fn subproof(&self, m: u64, from: u64, to: u64, complete: bool, proof: &mut Vec<Hash>) {
        let n = to - from;
        if m == n {
            if !complete {
                proof.push(self.subtree(from, to));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            self.subproof(m, from, from + k, complete, proof);
            proof.push(self.subtree(from + k, to));
        } else {
            self.subproof(m - k, from + k, to, false, proof);
            proof.push(self.subtree(from, from + k));
        }
    }
}

/// Checks an audit path (RFC 9162 §2.1.3.2): leaf `index` with hash `leaf` is in
/// the tree of `size` leaves whose root is `root`.
pub fn check_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *root
}

/// Checks a consistency proof (RFC 9162 §2.1.4.2): the tree of `new` leaves with
/// root `new_root` extends the tree of `old` leaves with root `old_root`.
pub fn check_consistency(old: u64, new: u64, old_root: &Hash, new_root: &Hash, proof: &[Hash]) -> bool {
    if old == new {
        return proof.is_empty() && old_root == new_root;
    }
    if old == 0 || old > new || proof.is_empty() {
        return false;
    }
    let mut path: Vec<Hash> = proof.to_vec();
    if old.is_power_of_two() {
        path.insert(0, *old_root);
    }
    let (mut f, mut s) = (old - 1, new - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && fr == *old_root && sr == *new_root
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn leaves(n: u64) -> Leaves {
        Leaves((0..n).map(|i| leaf_hash(format!("line {i}").as_bytes())).collect())
    }

    fn hex(h: &Hash) -> String {
        crate::audit::hex(h)
    }

    /// RFC 6962's reference vectors (the leaves and roots of the certificate-transparency test suite).
    #[test]
    fn roots_match_the_reference_vectors() {
        let data: [&[u8]; 8] = [
            b"",
            &[0x00],
            &[0x10],
            &[0x20, 0x21],
            &[0x30, 0x31],
            &[0x40, 0x41, 0x42, 0x43],
            &[0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
            &[0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x6f],
        ];
        let roots = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        assert_eq!(hex(&empty_root()), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        let mut frontier = Frontier::default();
        let all = Leaves(data.iter().map(|d| leaf_hash(d)).collect());
        for (i, (d, root)) in data.iter().zip(roots).enumerate() {
            frontier.push(leaf_hash(d));
            assert_eq!(hex(&frontier.root()), root, "size {}", i + 1);
            assert_eq!(hex(&all.root(i as u64 + 1)), root);
            assert_eq!(hex(&all.subtree(0, i as u64 + 1)), root);
        }
    }

    #[test]
    fn every_inclusion_proof_checks_and_no_altered_one_does() {
        let all = leaves(33);
        for size in 1..=33 {
            let root = all.root(size);
            for index in 0..size {
                let proof = all.inclusion_proof(index, size).unwrap();
                let leaf = all.0[index as usize];
                assert!(check_inclusion(index, size, &leaf, &proof, &root), "{index} in {size}");
                assert!(!check_inclusion(index, size, &leaf_hash(b"forged"), &proof, &root));
                if size > 1 {
                    assert!(!check_inclusion((index + 1) % size, size, &leaf, &proof, &root));
                    let mut altered = proof.clone();
                    altered[0][0] ^= 1;
                    assert!(!check_inclusion(index, size, &leaf, &altered, &root));
                    assert!(!check_inclusion(index, size, &leaf, &proof[1..], &root));
                }
            }
        }
        assert_eq!(all.inclusion_proof(3, 3), None);
        assert_eq!(all.inclusion_proof(0, 34), None);
    }

    #[test]
    fn every_consistency_proof_checks_and_no_altered_one_does() {
        let all = leaves(33);
        for new in 1..=33 {
            let new_root = all.root(new);
            for old in 1..=new {
                let old_root = all.root(old);
                let proof = all.consistency_proof(old, new).unwrap();
                assert!(check_consistency(old, new, &old_root, &new_root, &proof), "{old} → {new}");
                assert!(!check_consistency(old, new, &leaf_hash(b"x"), &new_root, &proof));
                assert!(!check_consistency(old, new, &old_root, &leaf_hash(b"x"), &proof));
                if old < new {
                    let mut altered = proof.clone();
                    let last = altered.len() - 1;
                    altered[last][0] ^= 1;
                    assert!(!check_consistency(old, new, &old_root, &new_root, &altered));
                    assert!(!check_consistency(old, new, &old_root, &new_root, &proof[..last]));
                    // A different history of the same length is not an extension.
                    let mut other = all.clone();
                    other.0[(old - 1) as usize] = leaf_hash(b"rewritten");
                    assert!(!check_consistency(old, new, &old_root, &other.root(new), &proof));
                }
            }
        }
        assert_eq!(all.consistency_proof(0, 3), None);
        assert_eq!(all.consistency_proof(4, 3), None);
    }
}
