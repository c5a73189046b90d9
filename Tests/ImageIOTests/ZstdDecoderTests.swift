import Crypto
import Foundation
@testable import ImageIO
import Testing
import TestSupport

/// The zstd decoder keeps its own round buffer (libzstd's buffer-less API): these tests feed
/// it compressed bytes in odd-sized pieces, ask for output in odd sizes, drop some of it, and
/// compare every byte handed out with what `zstd -d` makes of the same file.
@Suite("zstd decoding with our own round buffer")
struct ZstdDecoderTests {
    let scratch: TemporaryDirectory
    init() throws { scratch = try TemporaryDirectory("provision-zstd") }

    /// Random stretches, zeros and repeats of earlier bytes (back-references near and far).
    static func mixedImage(_ size: Int) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(size)
        var seed: UInt64 = 7
        func next() -> UInt64 { seed = seed &* 6364136223846793005 &+ 1442695040888963407; return seed >> 17 }
        while out.count < size {
            let n = Int(next() % (96 << 10)) + 1
            switch next() % 3 {
            case 0: out += patternBytes(n, seed: next())
            case 1: out += [UInt8](repeating: 0, count: n)
            default:
                if out.count > 1 {
                    let from = Int(next() % UInt64(out.count))
                    out += out[from..<min(out.count, from + n)]
                }
            }
        }
        return Array(out.prefix(size))
    }

    func compress(_ data: [UInt8], _ flags: String...) throws -> [UInt8] {
        let raw = try scratch.write("in.raw", data)
        try Command.check(["zstd", "-q", "-f"] + flags + [raw, "-o", raw + ".zst"])
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: raw + ".zst")))
    }

    /// Decodes `compressed` in pieces of pseudo-random sizes, dropping some output; returns
    /// how many bytes were handed out and how many of those differed from `expected`.
    func decodeInPieces(_ compressed: [UInt8], expected: [UInt8], seed: UInt64, maxPiece: Int) throws -> (total: Int, wrong: Int) {
        let decoder = ZstdDecoder()
        var state = seed
        func next(_ bound: Int) -> Int { state = state &* 6364136223846793005 &+ 1442695040888963407; return Int((state >> 33) % UInt64(bound)) + 1 }
        let scratchBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 16, alignment: 64)
        defer { scratchBuffer.deallocate() }
        var output = [UInt8](repeating: 0, count: 1 << 18)
        var inPos = 0, outPos = 0, wrong = 0
        try compressed.withUnsafeBytes { all in
            while true {
                let end = min(all.count, inPos + next(maxPiece))
                let piece = UnsafeRawBufferPointer(rebasing: all[inPos..<end])
                let atEnd = end == all.count
                let want = next(output.count)
                let r: (consumed: Int, produced: Int, finished: Bool)
                if next(4) == 1 {
                    r = try decoder.discard(want, input: piece, scratch: scratchBuffer, atEndOfInput: atEnd)
                } else {
                    r = try output.withUnsafeMutableBytes { try decoder.decode(input: piece, output: UnsafeMutableRawBufferPointer(rebasing: $0[..<want]), atEndOfInput: atEnd) }
                    for i in 0..<r.produced where outPos + i >= expected.count || output[i] != expected[outPos + i] { wrong += 1 }
                }
                inPos += r.consumed
                outPos += r.produced
                if r.finished { break }
                if r.consumed == 0 && r.produced == 0 && (atEnd || !piece.isEmpty) { throw FixtureError("decoder stalled at input \(inPos), output \(outPos)") }
            }
        }
        return (outPos, wrong)
    }

    @Test("byte-exact in pieces of 1 byte to 1 MiB, at fast and strong levels", arguments: [
        ("-1", 7), ("-1", 1 << 20), ("-19", 4096), ("--fast=3", 131_075),
    ])
    func pieces(level: String, maxPiece: Int) throws {
        let data = ZstdDecoderTests.mixedImage(3 << 20)
        let compressed = try compress(data, level)
        let r = try decodeInPieces(compressed, expected: data, seed: UInt64(maxPiece), maxPiece: maxPiece)
        #expect(r.total == data.count)
        #expect(r.wrong == 0)
    }

    @Test("a window much smaller than the image: the round buffer wraps many times and back-references still find their bytes")
    func smallWindowWraps() throws {
        // 900 KiB of random bytes, again and again with a few changed: nearly every block is
        // back-references 900 KiB back, close to the 1 MiB window, so they reach into the part
        // of the round buffer written before its last wrap.
        var data: [UInt8] = []
        var block = patternBytes(900 << 10, seed: 5)
        for i in 0..<12 {
            block[(i * 7919) % block.count] &+= 1
            data += block
        }
        // 1 MiB window: the round buffer is ~1.25 MiB, so 10.5 MiB wrap it 8 times.
        let compressed = try compress(data, "-3", "--zstd=wlog=20")
        #expect(compressed.count < data.count / 3, "the test needs an image made of back-references")
        let r = try decodeInPieces(compressed, expected: data, seed: 3, maxPiece: 50_000)
        #expect(r.total == data.count && r.wrong == 0)
    }

    @Test("several frames and a skippable frame in a row decode as zstd -d does")
    func framesAndSkippableFrames() throws {
        let first = ZstdDecoderTests.mixedImage(700_000)
        let second = Array(ZstdDecoderTests.mixedImage(900_000).reversed())
        // A skippable frame: magic 0x184D2A5?, little-endian length, then that many bytes.
        let skippable: [UInt8] = [0x53, 0x2A, 0x4D, 0x18, 5, 0, 0, 0, 1, 2, 3, 4, 5]
        let stream = try compress(first, "-1") + skippable + (try compress(second, "-5", "--no-check"))
        let file = try scratch.write("frames.zst", stream)
        let reference = try Command.run(["sh", "-c", "zstd -dc '\(file)' | sha256sum"])
        let r = try decodeInPieces(stream, expected: first + second, seed: 11, maxPiece: 3000)
        #expect(r.total == first.count + second.count && r.wrong == 0)
        let digest = SHA256.hash(data: first + second).map { String(format: "%02x", $0) }.joined()
        #expect(reference.stdout.hasPrefix(digest), "zstd -d disagrees with the test's expectation")
    }

    @Test("tiny frames back to back, each shorter than a frame header can be, decode in any pieces", arguments: [1, 5, 1 << 20])
    func tinyFrames(maxPiece: Int) throws {
        var stream: [UInt8] = []
        var expected: [UInt8] = []
        for size in [0, 1, 3, 0, 10, 2] {
            let data = patternBytes(size, seed: UInt64(size + 1))
            stream += try compress(data, "-1")
            expected += data
        }
        let r = try decodeInPieces(stream, expected: expected, seed: 9, maxPiece: maxPiece)
        #expect(r.total == expected.count && r.wrong == 0)
    }

    @Test("an empty input is a clean end, a lone frame header is truncated")
    func emptyAndHeaderOnly() throws {
        #expect(try decodeInPieces([], expected: [], seed: 1, maxPiece: 10).total == 0)
        let compressed = try compress(ZstdDecoderTests.mixedImage(100_000), "-1")
        #expect(throws: DecodeFailure.self) { try decodeInPieces(Array(compressed.prefix(9)), expected: [], seed: 1, maxPiece: 4) }
    }
}
