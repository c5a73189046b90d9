@testable import ImageIO
import Testing

/// The read-back fingerprint of compressed sources must tell apart exactly what a bad card
/// returns: one flipped bit anywhere, a chunk from another offset, a short or longer read.
@Suite("chunk fingerprint")
struct FingerprintTests {
    func print(_ bytes: [UInt8]) -> Fingerprint { bytes.withUnsafeBytes { Fingerprint($0) } }

    @Test func sameBytesSameFingerprint() {
        let data = patternBytes(1 << 20 + 13)
        #expect(print(data) == print(data))
    }

    @Test("every single-bit flip changes it, in every lane and in the unaligned tail")
    func everyBitFlipIsSeen() {
        let data = patternBytes(4096 + 29)
        let reference = print(data)
        var seen = Set<[UInt64]>()
        for byte in stride(from: 0, to: data.count, by: 1) {
            for bit in [0, 3, 7] {
                var damaged = data
                damaged[byte] ^= UInt8(1 << bit)
                let f = print(damaged)
                #expect(f != reference, "flip of bit \(bit) at byte \(byte) not seen")
                seen.insert([f.high, f.low])
            }
        }
        // No two damaged versions collide either: the value spreads.
        #expect(seen.count == data.count * 3)
    }

    @Test("data from another offset (a fake-capacity card wrapping around) and zeros differ")
    func wrongDataDiffers() {
        let image = patternBytes(8 << 20)
        let chunk = Array(image[(4 << 20)..<(5 << 20)])
        let wrapped = Array(image[0..<(1 << 20)])
        #expect(print(chunk) != print(wrapped))
        #expect(print([UInt8](repeating: 0, count: 1 << 20)) != print([UInt8](repeating: 0, count: (1 << 20) - 8)))
        #expect(print([UInt8](repeating: 0, count: 1 << 20)) != print([UInt8](repeating: 0xFF, count: 1 << 20)))
    }

    @Test("swapped 8-byte words (lanes) are seen")
    func swappedWordsDiffer() {
        var data = patternBytes(64)
        let reference = print(data)
        for i in 0..<8 { data.swapAt(i, i + 8) }
        #expect(print(data) != reference)
        #expect(print([]) != print([0]))
    }
}
