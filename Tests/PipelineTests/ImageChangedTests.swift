// A raw image rebuilt in place while a card is written from it: the card and its
// verification both read the file as it is at that moment.

import Foundation
import ImageIO
import Pipeline
import Synchronization
import Testing
import TestSupport

@Suite("A raw image changed while a card is written")
struct ImageChangedTests {
    /// Records the write's progress, for the test to act once it is under way.
    final class Progress: CardReportSink {
        let written = Mutex<UInt64>(0)
        func receive(_ report: CardReport) {
            switch report {
            case .progress(let p) where p.phase == .writing, .stage(.writing, _, _, let p?):
                written.withLock { $0 = max($0, p.bytesDone) }
            default: break
            }
        }
    }

    @Test("an image rebuilt in place mid-write fails the card as an image error naming the file: not repaired with the new bytes, not a failing card",
          arguments: [false, true], [false, true])
    func rebuiltInPlace(station: Bool, truncatedOnly: Bool) async throws {
        let directory = try TemporaryDirectory("provision-image-changed")
        defer { directory.remove() }
        let image = directory.file("image.img"), next = directory.file("next.img")
        try await offPool {
            try Command.bash("head -c \(8 << 20) /dev/urandom > '\(image)' && head -c \(8 << 20) /dev/urandom > '\(next)'")
        }
        let card = try await offPool { try LoopCard(label: "changed", size: 16 << 20) }
        defer { card.close() }
        // 8 MiB at 2 MB/s: the rebuild lands in the middle of the write.
        try card.throttle(writeBytesPerSecond: 2_000_000)
        var job = CardJob(image: image, target: card.devicePath, policy: nil)
        job.bmap = .none
        job.probeCapacity = false
        job.progressInterval = .zero
        // The station's way (a budget: spliced from the file, compared piece by piece) and
        // `provision write`'s.
        if station { job.budget = BufferBudget(limit: 16 << 20) }
        let progress = Progress()
        let pipelineJob = job
        let outcome = try await offPool { () throws -> CardOutcome in
            let finished = DispatchSemaphore(value: 0)
            let result = Mutex<CardOutcome?>(nil)
            let thread = Thread {
                result.withLock { $0 = CardPipeline(job: pipelineJob, sink: progress).run() }
                finished.signal()
            }
            thread.start()
            let deadline = ContinuousClock.now + .seconds(120)
            while progress.written.withLock({ $0 }) < 2 << 20 && ContinuousClock.now < deadline { usleep(10_000) }
            // Rebuilt in place: the same inode, new bytes (what `cp` over it does). Or caught
            // between the two steps of a rebuild: emptied, not yet written (`cp` truncates
            // first; a writer reading then finds the image short).
            try Command.check(truncatedOnly ? ["truncate", "-s", "0", image] : ["cp", next, image])
            finished.wait()
            return try #require(result.withLock { $0 })
        }
        guard case .failed(let failure) = outcome else {
            Issue.record("a card written from an image rebuilt mid-write ended \(outcome)")
            return
        }
        #expect(failure.kind == .image(.imageUnreadable), "\(failure)")
        #expect(failure.message.contains("\(image) changed while it was written"), "\(failure.message)")
        #expect(failure.verdict == nil, "a verdict on the card: \(String(describing: failure.verdict))")
    }
}
