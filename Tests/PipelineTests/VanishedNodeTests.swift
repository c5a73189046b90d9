// A station card whose device node is gone by the time its job opens it (a reader pulled
// while the image downloaded): the job fails "removed", and nothing is created where the
// node was. A regular file there would take the node's name when the reader came back.

import BlockDevices
import ImageIO
import Foundation
import Pipeline
import Testing
import TestSupport

private struct NoReports: CardReportSink {
    func receive(_ report: CardReport) {}
}

@Suite("A card whose node vanished")
struct VanishedNodeTests {
    @Test("a station job on a node that no longer exists fails 'removed' and leaves no file behind; provision write still makes a file target")
    func noFileWhereTheNodeWas() throws {
        let directory = try TemporaryDirectory("provision-vanished")
        let image = directory.file("image.img")
        try Command.check(["bash", "-c", "head -c 1048576 /dev/urandom > \(image)"])
        let node = "/dev/provision-gone-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: node) }
        var job = CardJob(image: image, target: node, policy: SafetyPolicy(mode: .station(allowLoopDevices: true)))
        job.probeCapacity = false
        guard case .failed(let failure) = CardPipeline(job: job, sink: NoReports()).run() else {
            Issue.record("the job did not fail")
            return
        }
        #expect(failure.kind == .image(.deviceRemoved), "\(failure.kind): \(failure.message)")
        #expect(failure.message.contains("nothing was written"), "\(failure.message)")
        #expect(!FileManager.default.fileExists(atPath: node), "the station made \(node)")

        // A person's `provision write` to a path that names nothing makes that file.
        let file = directory.file("out.img")
        var offline = CardJob(image: image, target: file, policy: SafetyPolicy(mode: .offline))
        offline.probeCapacity = false
        guard case .done = CardPipeline(job: offline, sink: NoReports()).run() else {
            Issue.record("provision write to a new file failed")
            return
        }
        #expect(try Command.run(["cmp", image, file]).succeeded)
    }

    @Test("a station job cancelled before its card is opened does not open it")
    func cancelledBeforeOpen() throws {
        let directory = try TemporaryDirectory("provision-vanished")
        let image = directory.file("image.img")
        try Command.check(["bash", "-c", "head -c 1048576 /dev/urandom > \(image)"])
        let card = try LoopCard(label: "cancel-before-open", size: 8 << 20)
        defer { card.close() }
        let before = try card.sha256(bytes: 4 << 20)
        let cancellation = CancellationFlag()
        cancellation.cancel()
        let job = CardJob(image: image, target: card.devicePath, policy: SafetyPolicy(mode: .station(allowLoopDevices: true)))
        guard case .cancelled(let why) = CardPipeline(job: job, cancellation: cancellation, sink: NoReports()).run() else {
            Issue.record("the job was not cancelled")
            return
        }
        #expect(why.contains("before the card was opened"), "\(why)")
        #expect(try card.sha256(bytes: 4 << 20) == before, "the card is untouched")
    }
}
