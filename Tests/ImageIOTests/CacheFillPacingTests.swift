#if canImport(Glibc)
import Glibc
#endif
import Foundation
@testable import ImageIO
import Testing
import TestSupport

/// A paced cache fill (issue 18): before any card reads it decodes only its start, then it
/// stays its lead ahead of the furthest byte a card asked for, and run free it ends with the
/// image that `zstd -d` / `xz -d` make. In the xz suite: it starts `prov-xz-fill` threads,
/// which that suite's leak checks count (serialized).
extension ParallelXZFillTests {

    /// The offsets where the fill started waiting for its readers, as they come.
    final class PauseLog: @unchecked Sendable {
        private let condition = NSCondition()
        private var offsets: [UInt64] = []

        func record(_ offset: UInt64) { condition.withLock { offsets.append(offset); condition.broadcast() } }

        /// Waits (up to `seconds`) for a pause at `offset` or beyond; the offset, or nil.
        func pause(atOrBeyond offset: UInt64, seconds: Double) -> UInt64? {
            let deadline = Date(timeIntervalSinceNow: seconds)
            return condition.withLock {
                while true {
                    if let found = offsets.first(where: { $0 >= offset }) { return found }
                    if !condition.wait(until: deadline) { return nil }
                }
            }
        }

        var all: [UInt64] { condition.withLock { offsets } }
    }

    /// Runs `body` on a thread of its own and waits up to `seconds` for it; false if it did
    /// not end by then (it is left to end by itself).
    static func within(_ seconds: Double, _ body: @escaping @Sendable () -> Void) async -> Bool {
        await offPool {
            let done = DispatchSemaphore(value: 0)
            Thread { body(); done.signal() }.start()
            return done.wait(timeout: .now() + seconds) == .success
        }
    }

    @Test("a paced fill decodes its start, waits for a card, then stays its lead ahead; run free it makes what the decompressor makes",
          arguments: ["zst", "xz"])
    func pacedFill(format: String) async throws {
        let dir = try TemporaryDirectory("provision-pace")
        let raw = dir.file("disk.img")
        // 24 MiB, every MiB different: text and random by turns.
        var image: [UInt8] = []
        for i in 0..<24 { image += i % 2 == 0 ? Self.text(Self.mib) : patternBytes(Self.mib, seed: UInt64(i + 1)) }
        try Data(image).write(to: URL(fileURLWithPath: raw))
        let compressed = raw + "." + format
        // xz in 1 MiB blocks on two workers: the block-parallel fill; zstd: the serial one.
        let tool = format == "xz" ? "xz -T2 --block-size=1MiB -3 -c" : "zstd -q -3 -c"
        _ = try run("sh", "-c", "\(tool) '\(raw)' > '\(compressed)'")
        let cache = dir.file("cache")
        _ = FileManager.default.createFile(atPath: cache, contents: nil)

        let mib = UInt64(Self.mib)
        let progress = CacheFill()
        progress.pace(lead: 4 * mib, startLead: 2 * mib)
        let pauses = PauseLog()
        progress.pausedAt = { pauses.record($0) }
        let filling = Task {
            try await Self.fill(compressed, bmap: nil, size: image.count, into: cache, threads: format == "xz" ? 2 : nil, progress: progress)
        }
        // Whatever fails below, the fill is let go so that the task ends.
        defer { progress.stopPacing() }

        // No card has read: the fill stops at its start.
        let first = await offPool { pauses.pause(atOrBeyond: 2 * mib, seconds: 120) }
        #expect(first != nil, "the fill never waited for a card (pauses: \(pauses.all))")
        #expect(progress.filledUpTo <= 2 * mib, "decoded up to \(progress.filledUpTo) with no card reading and a 2 MiB start")
        #expect(!progress.isComplete)
        #expect(pauses.all.allSatisfy { $0 >= 2 * mib }, "paused before its start was decoded: \(pauses.all)")

        // A card asks for 6 MiB: the fill decodes them and 4 MiB more, then waits again.
        let read = await Self.within(120) { _ = try? progress.wait(upTo: 6 * mib) }
        #expect(read, "a card asking for 6 MiB was not served (filled up to \(progress.filledUpTo))")
        let second = await offPool { pauses.pause(atOrBeyond: 10 * mib, seconds: 120) }
        #expect(second != nil, "the fill never waited again after the card's read (pauses: \(pauses.all))")
        let mark = progress.filledUpTo
        #expect(mark >= 6 * mib && mark <= 10 * mib, "filled up to \(mark): a card read 6 MiB, the lead is 4 MiB")
        #expect(!progress.isComplete)

        // Let go, it runs to the end, and the cache is the image.
        progress.stopPacing()
        let out = try await filling.value
        #expect(out.error == nil)
        #expect(progress.isComplete)
        #expect(progress.pauses >= 2)
        _ = try run("sh", "-c", "\(format == "xz" ? "xz" : "zstd -q") -d -c '\(compressed)' > '\(dir.file("plain"))'")
        _ = try run("cmp", dir.file("plain"), cache)
    }

    @Test("an unpaced fill never waits, with no reader at all")
    func unpacedFillRunsFree() async throws {
        let dir = try TemporaryDirectory("provision-pace")
        let raw = dir.file("disk.img")
        try Data(patternBytes(12 * Self.mib, seed: 5)).write(to: URL(fileURLWithPath: raw))
        _ = try run("sh", "-c", "zstd -q -3 -c '\(raw)' > '\(raw).zst'")
        let progress = CacheFill()
        let out = try await Self.fill(raw + ".zst", bmap: nil, size: 12 * Self.mib, into: dir.file("cache"), threads: nil, progress: progress)
        #expect(out.error == nil)
        #expect(progress.pauses == 0)
        _ = try run("cmp", raw, dir.file("cache"))
    }
}
