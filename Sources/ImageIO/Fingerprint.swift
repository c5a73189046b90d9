/// A fast 128-bit fingerprint of a chunk, for comparing what the card returns with what was
/// written when the source cannot simply be read again (a compressed stream).
///
/// Why not SHA-256 here: the value is computed by us from the stream and compared by us with
/// the read-back, so nobody can choose data to collide with it; what it must catch is a card
/// that returns other bytes (flipped bits, lost writes, a fake-capacity card that wraps to an
/// earlier offset). A multiply–rotate hash over four 64-bit lanes does that with a miss
/// probability of about 2⁻⁶⁴ per damaged chunk, at several GB/s, where SHA-256 runs at
/// ~1.2 GB/s and, computed twice (stream and read-back), took a whole core on a 2-core
/// station. SHA-256 stays where the expected value comes from outside: the bmap's checksums.
struct Fingerprint: Equatable, Sendable {
    let high: UInt64
    let low: UInt64

    private static let prime1: UInt64 = 0x9E37_79B1_85EB_CA87
    private static let prime2: UInt64 = 0xC2B2_AE3D_27D4_EB4F
    private static let prime3: UInt64 = 0x1656_67B1_9E37_79F9
    private static let prime4: UInt64 = 0x85EB_CA77_C2B2_AE63

    init(_ bytes: UnsafeRawBufferPointer) {
        var lanes: (UInt64, UInt64, UInt64, UInt64) = (Self.prime1 &+ Self.prime2, Self.prime2, 0, 0 &- Self.prime1)
        let count = bytes.count
        var offset = 0
        if let base = bytes.baseAddress {
            while offset + 32 <= count {
                lanes.0 = Self.round(lanes.0, base.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
                lanes.1 = Self.round(lanes.1, base.loadUnaligned(fromByteOffset: offset + 8, as: UInt64.self))
                lanes.2 = Self.round(lanes.2, base.loadUnaligned(fromByteOffset: offset + 16, as: UInt64.self))
                lanes.3 = Self.round(lanes.3, base.loadUnaligned(fromByteOffset: offset + 24, as: UInt64.self))
                offset += 32
            }
            while offset + 8 <= count {
                lanes.0 = Self.round(lanes.0, base.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
                offset += 8
            }
            var last: UInt64 = 0
            var shift: UInt64 = 0
            while offset < count {
                last |= UInt64(base.load(fromByteOffset: offset, as: UInt8.self)) << shift
                shift += 8
                offset += 1
            }
            if shift > 0 { lanes.1 = Self.round(lanes.1, last) }
        }
        let length = UInt64(count)
        high = Self.avalanche(Self.merge(lanes.0, lanes.1, lanes.2, lanes.3) ^ length)
        low = Self.avalanche(Self.merge(lanes.3 ^ Self.prime3, lanes.2, lanes.1, lanes.0 &+ Self.prime4) &+ length &* Self.prime1)
    }

    @inline(__always)
    private static func round(_ lane: UInt64, _ word: UInt64) -> UInt64 {
        (lane &+ word &* prime2).rotatedLeft(by: 31) &* prime1
    }

    private static func merge(_ a: UInt64, _ b: UInt64, _ c: UInt64, _ d: UInt64) -> UInt64 {
        var h = a.rotatedLeft(by: 1) &+ b.rotatedLeft(by: 7) &+ c.rotatedLeft(by: 12) &+ d.rotatedLeft(by: 18)
        for lane in [a, b, c, d] {
            h = (h ^ round(0, lane)) &* prime1 &+ prime4
        }
        return h
    }

    private static func avalanche(_ value: UInt64) -> UInt64 {
        var h = value
        h ^= h >> 33
        h = h &* prime2
        h ^= h >> 29
        h = h &* prime3
        h ^= h >> 32
        return h
    }
}

extension UInt64 {
    @inline(__always)
    fileprivate func rotatedLeft(by n: UInt64) -> UInt64 { (self << n) | (self >> (64 - n)) }
}
