// One repair attempt after a bad read-back (issue 16), against FakeCards that invert a
// byte on its first read after it was written (a cell that settles) or on every read.

import Foundation
import ImageIO
import Pipeline
import Testing
import TestSupport

private func randomImage(_ directory: TemporaryDirectory, bytes: Int) throws -> String {
    let path = directory.path + "/image.img"
    try Command.bash("head -c \(bytes) /dev/urandom > \(path)")
    return path
}

@Suite("Repair after a bad read-back", .serialized)
struct RepairTests {
    static let flipAt: Int64 = (1 << 20) + 12345

    @Test func aByteThatReadsWrongOnceIsRepairedAndNoted() throws {
        let directory = try TemporaryDirectory("provision-repair")
        defer { directory.remove() }
        let image = try randomImage(directory, bytes: 3 << 20)
        let fake = try FakeCard(label: "flip-once", claimedSize: 16 << 20, lie: .honest, flip: .once(at: Self.flipAt))
        defer { fake.close() }
        var job = CardJob(image: image, target: fake.devicePath, policy: nil)
        job.bmap = .none
        let outcome = CardPipeline(job: job, sink: CollectingSink()).run()
        guard case .done(let result) = outcome else {
            Issue.record("a card that settled after one rewrite failed: \(outcome)")
            return
        }
        #expect(result.write.repairedAt == [UInt64(Self.flipAt)])
        let expected = try Command.check(["sha256sum", image]).stdout.prefix(64)
        #expect(try fake.card.sha256(bytes: 3 << 20) == String(expected))
    }

    @Test func aByteThatReadsWrongTwiceFailsTheCard() throws {
        let directory = try TemporaryDirectory("provision-repair")
        defer { directory.remove() }
        let image = try randomImage(directory, bytes: 3 << 20)
        let fake = try FakeCard(label: "flip-always", claimedSize: 16 << 20, lie: .honest, flip: .always(at: Self.flipAt))
        defer { fake.close() }
        var job = CardJob(image: image, target: fake.devicePath, policy: nil)
        job.bmap = .none
        let outcome = CardPipeline(job: job, sink: CollectingSink()).run()
        guard case .failed(let failure) = outcome else {
            Issue.record("a card that always returns other data passed: \(outcome)")
            return
        }
        #expect(failure.kind == .image(.verifyMismatch))
        #expect(failure.message.hasPrefix("card returned other data twice at byte \(Self.flipAt): failing card"), "\(failure.message)")
    }

    @Test func anHonestCardNeedsNoRepair() throws {
        let directory = try TemporaryDirectory("provision-repair")
        defer { directory.remove() }
        let image = try randomImage(directory, bytes: 3 << 20)
        let fake = try FakeCard(label: "no-flip", claimedSize: 16 << 20, lie: .honest)
        defer { fake.close() }
        var job = CardJob(image: image, target: fake.devicePath, policy: nil)
        job.bmap = .none
        guard case .done(let result) = CardPipeline(job: job, sink: CollectingSink()).run() else {
            Issue.record("an honest fake card failed")
            return
        }
        #expect(result.write.repairedAt == nil)
    }
}
