/// Deterministic pseudo-random bytes (xorshift), so failures reproduce. One copy for every
/// test target.
public func patternBytes(_ count: Int, seed: UInt64 = 0x9E37_79B9_7F4A_7C15) -> [UInt8] {
    var x = seed
    var out = [UInt8](repeating: 0, count: count)
    var i = 0
    while i < count {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17
        withUnsafeBytes(of: x) { w in for b in w where i < count { out[i] = b; i += 1 } }
    }
    return out
}
