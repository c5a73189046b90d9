// The capacity probe as a step of the card pipeline: before the first image byte, on by
// default for block devices, off with `probeCapacity = false`.

import Foundation
import ImageIO
import Pipeline
import Synchronization
import Testing
import TestSupport

final class CollectingSink: CardReportSink {
    let reports = Mutex<[CardReport]>([])
    func receive(_ report: CardReport) { reports.withLock { $0.append(report) } }
}

private func randomImage(_ directory: TemporaryDirectory, bytes: Int) throws -> String {
    let path = directory.path + "/image.img"
    try Command.bash("head -c \(bytes) /dev/urandom > \(path)")
    return path
}

@Suite("Capacity probe in the pipeline", .serialized)
struct ProbeInPipelineTests {
    @Test func aCounterfeitCardFailsItsJobAndIsLeftAsItWas() throws {
        let directory = try TemporaryDirectory("provision-probe-job")
        defer { directory.remove() }
        let image = try randomImage(directory, bytes: 2 << 20)
        let fake = try FakeCard(label: "job-wrap", claimedSize: 64 << 20, lie: .wraps(realSize: 8 << 20))
        defer { fake.close() }
        let before = try fake.card.sha256()
        var job = CardJob(image: image, target: fake.devicePath, policy: nil)
        job.bmap = .none
        let outcome = CardPipeline(job: job, sink: CollectingSink()).run()
        guard case .failed(let failure) = outcome else {
            Issue.record("a counterfeit card was written: \(outcome)")
            return
        }
        #expect(failure.kind == .refused)
        #expect(failure.message.hasPrefix("card claims 67.1 MB but stores about 8.4 MB: refused as counterfeit"))
        #expect(try fake.card.sha256() == before)
    }

    @Test func anHonestCardIsProbedThenWritten() throws {
        let directory = try TemporaryDirectory("provision-probe-job")
        defer { directory.remove() }
        let image = try randomImage(directory, bytes: 3 << 20)
        let card = try LoopCard(label: "job-honest", size: 32 << 20)
        defer { card.close() }
        var job = CardJob(image: image, target: card.devicePath, policy: nil)
        job.bmap = .none
        let outcome = CardPipeline(job: job, sink: CollectingSink()).run()
        guard case .done(let result) = outcome else {
            Issue.record("an honest card failed: \(outcome)")
            return
        }
        let probe = try #require(result.probe)
        #expect(!probe.isCounterfeit && probe.blocks > 20)
        let expected = try Command.check(["sha256sum", image]).stdout.prefix(64)
        #expect(try card.sha256(bytes: 3 << 20) == String(expected))
    }

    /// Cancels its job when the write is about to begin: after the probe, before the first byte.
    final class CancelOnWriting: CardReportSink {
        let cancellation: CancellationFlag
        let sawWriting = Mutex(false)
        init(_ cancellation: CancellationFlag) { self.cancellation = cancellation }
        func receive(_ report: CardReport) {
            if case .stage(.writing, _, _, _) = report {
                sawWriting.withLock { $0 = true }
                cancellation.cancel()
            }
        }
    }

    @Test("a job that ends after a passed probe and before the image's first byte leaves the card as it was (the probe's blocks where the image goes too), and says nothing was written", arguments: [0, 2])
    func endingBeforeTheFirstBytePutsTheProbesBlocksBack(pipedRuns: Int) throws {
        let directory = try TemporaryDirectory("provision-probe-job")
        defer { directory.remove() }
        // The image covers the probe's window: those blocks are left to the write to overwrite.
        let image = try randomImage(directory, bytes: 24 << 20)
        let old = directory.path + "/old.img"
        try Command.bash("head -c \(32 << 20) /dev/urandom > \(old)")
        let card = try LoopCard(label: "job-before", size: 32 << 20, image: old)
        defer { card.close() }
        let before = try card.sha256()
        var job = CardJob(image: image, target: card.devicePath, policy: nil)
        job.bmap = .none
        // In a pipe, or in memory (a station's probe keeps it in a file: see CapacityProbeTests).
        job.probePipedRuns = pipedRuns
        let cancellation = CancellationFlag()
        let sink = CancelOnWriting(cancellation)
        let outcome = CardPipeline(job: job, cancellation: cancellation, sink: sink).run()
        #expect(sink.sawWriting.withLock { $0 }, "the job never got past the probe")
        guard case .cancelled(let message) = outcome else {
            Issue.record("the job ended \(outcome)")
            return
        }
        #expect(message.contains("nothing was written"), "\(message)")
        #expect(try card.sha256() == before, "the card is not as it was")
    }

    @Test func probeCapacityFalseSkipsIt() throws {
        let directory = try TemporaryDirectory("provision-probe-job")
        defer { directory.remove() }
        let image = try randomImage(directory, bytes: 1 << 20)
        // Writing 1 MiB to a card that wraps at 8 MiB works: exactly the case the probe is for.
        let fake = try FakeCard(label: "job-noprobe", claimedSize: 64 << 20, lie: .wraps(realSize: 8 << 20))
        defer { fake.close() }
        var job = CardJob(image: image, target: fake.devicePath, policy: nil)
        job.bmap = .none
        job.probeCapacity = false
        let outcome = CardPipeline(job: job, sink: CollectingSink()).run()
        guard case .done(let result) = outcome else {
            Issue.record("the write failed: \(outcome)")
            return
        }
        #expect(result.probe == nil)
    }
}
