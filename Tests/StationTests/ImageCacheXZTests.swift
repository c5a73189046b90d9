#if canImport(Glibc)
import Glibc
#endif
import Foundation
@testable import ImageIO
@testable import Station
import Testing
import TestSupport

/// The station's cache with a multi-block .xz (issue 18): the job's note says on how many
/// threads the image is decoded, and a card reading the cache while it fills gets the image.
@Suite("image cache: a multi-block xz image")
struct ImageCacheXZTests {
    @Test("the note names the decoder threads, and a reader of the growing cache gets xz -d's bytes")
    func noteAndContent() async throws {
        let dir = try TemporaryDirectory("provision-cachexz")
        // Tools, the fill and the reads block: all of it off the concurrency pool.
        let seen = try await offPool { () throws -> (note: String, fit: Int, mappedBlocks: Int, read: [UInt8], image: [UInt8]) in
            let raw = dir.file("disk.img")
            let size = 6 << 20
            var image = [UInt8](repeating: 0, count: size)
            image.replaceSubrange(0..<(2 << 20), with: patternBytes(2 << 20, seed: 21))
            image.replaceSubrange((3 << 20)..<(5 << 20), with: Array(repeating: Array("station cache line\n".utf8), count: (2 << 20) / 19 + 1).joined().prefix(2 << 20))
            try Data(image).write(to: URL(fileURLWithPath: raw))
            // Holes where the image has zeros, so that the bmap leaves them out.
            try Command.check(["fallocate", "--dig-holes", raw])
            try Command.check(["bmaptool", "-q", "create", "-o", raw + ".bmap", raw])
            try Command.bash("xz -T2 --block-size=1MiB -3 -c '\(raw)' > '\(raw).xz'")
            let bmap = try Bmap.load(path: raw + ".bmap")
            // What the plan decides, computed from xz's own listing: min(cores, 24 MiB / (decoder +
            // 2 MiB), blocks with mapped data); 1 when that is below 2.
            let listing = try Command.check(["xz", "--robot", "-lvv", raw + ".xz"]).stdout
            let blocks = listing.split(separator: "\n").map { $0.split(separator: "\t", omittingEmptySubsequences: false) }.filter { $0.first == "block" }
            let memory = blocks.compactMap { UInt64($0[14]) }.max() ?? 0
            let mappedBlocks = blocks.filter { b in
                let start = UInt64(b[5])!, end = start + UInt64(b[7])!
                return bmap.mappedByteRanges.contains { $0.start < end && $0.end > start }
            }.count
            let fit = min(ProcessInfo.processInfo.activeProcessorCount, Int((24 << 20) / (memory + (2 << 20))), mappedBlocks)
            let store = try ImageCacheStore(directory: dir.file("cache"), limit: 1 << 30)
            let (source, key, note) = try store.source(for: raw + ".xz", bmap: bmap)
            defer { store.release(key) }
            var out = [UInt8](repeating: 0xAA, count: size + 1)
            var filled = 0
            while filled < out.count {
                let n = try out.withUnsafeMutableBytes { try source.read(into: $0.baseAddress! + filled, count: $0.count - filled) }
                if n == 0 { break }
                filled += n
            }
            return (note, fit, mappedBlocks, Array(out.prefix(filled)), image)
        }
        #expect(seen.mappedBlocks == 4)
        if seen.fit >= 2 {
            #expect(seen.note.hasPrefix("decompressing xz once for every card on up to \(seen.fit) threads ("), "\(seen.note)")
        } else {
            #expect(seen.note.hasPrefix("decompressing xz once for every card ("), "\(seen.note)")
        }
        #expect(seen.read.count == seen.image.count)
        #expect(seen.read == seen.image)
    }
}

/// The station's cache fill is paced by its cards (issue 18), and let go when none is left.
@Suite("image cache: the fill keeps pace with its cards")
struct ImageCachePacingTests {
    @Test("the fill stops ahead of its one card, and runs to the end once that card lets go")
    func pacedUntilReleased() async throws {
        let dir = try TemporaryDirectory("provision-cachepace")
        let seen = try await offPool { () throws -> (filledWhilePaced: UInt64, paused: Bool, complete: Bool, lead: UInt64, ended: Bool) in
            let raw = dir.file("disk.img")
            // 64 MiB: more than the 8 MiB start and the 32 MiB lead together.
            var image: [UInt8] = []
            for i in 0..<64 { image += patternBytes(1 << 20, seed: UInt64(i + 31)) }
            try Data(image).write(to: URL(fileURLWithPath: raw))
            try Command.bash("zstd -q -3 -c '\(raw)' > '\(raw).zst'")
            let store = try ImageCacheStore(directory: dir.file("cache"), limit: 1 << 30)
            let (source, key, _) = try store.source(for: raw + ".zst", bmap: nil)
            let entry = try #require(key)
            let fill = try #require(store.fill(ofEntry: entry))
            // The card reads its first MiB: the fill may then go 32 MiB beyond it, and no further.
            var first = [UInt8](repeating: 0, count: 1 << 20)
            _ = try first.withUnsafeMutableBytes { try source.read(into: $0.baseAddress!, count: $0.count) }
            #expect(first == Array(image.prefix(1 << 20)))
            // The fill stops to wait for the card (an unpaced one would run to its end).
            let paused = fill.waitForPause(seconds: 120)
            let filledWhilePaced = fill.filledUpTo, complete = fill.isComplete
            // The card is done with the image: nothing paces the fill any more.
            store.release(key)
            let endedAfterRelease = fill.waitForEnd(seconds: 120)
            return (filledWhilePaced, paused, complete, (32 << 20) + (1 << 20), endedAfterRelease && fill.isComplete)
        }
        #expect(seen.paused, "the fill never waited for its card")
        #expect(!seen.complete, "the fill ended with one card having read 1 MiB of 64")
        #expect(seen.filledWhilePaced <= seen.lead, "filled up to \(seen.filledWhilePaced) with a card at 1 MiB")
        #expect(seen.ended, "the fill did not run to its end after its last card let go")
    }
}
