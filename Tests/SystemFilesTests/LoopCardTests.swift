// The LoopCard fixture itself: the other targets' tests rely on its throttle, its hash and
// its simulated card removal doing what they say.

import Dispatch
import Foundation
import Testing
import TestSupport

/// A command started on a thread of its own the moment it is made, by whichever thread makes
/// it. Not through an `async let` or a task: under a full parallel test run Swift's pool
/// (2 threads here) is held by other suites' synchronous tests, and a child task that was
/// to start the writer once waited 90 s for a pool thread while the test waited for the
/// writer (CI failed so). Not on GCD's global queue either: it is as narrow.
final class StartedCommand: @unchecked Sendable {
    private let finished = DispatchSemaphore(value: 0)
    private var result: Result<CommandOutput, any Error> = .failure(CancellationError())

    init(_ arguments: [String]) {
        let thread = Thread { [self] in
            result = Result { try Command.run(arguments, timeout: .seconds(120)) }
            finished.signal()
        }
        thread.stackSize = 1 << 20
        thread.start()
    }

    /// Blocks until the command has ended: call it off the pool.
    func wait() throws -> CommandOutput {
        finished.wait()
        return try result.get()
    }
}

/// A file of `size` bytes, all 0xAB: written data that a zero-filled card does not have.
func patternFile(in directory: TemporaryDirectory, size: Int) throws -> String {
    let path = directory.path + "/pattern.bin"
    try Data(repeating: 0xAB, count: size).write(to: URL(fileURLWithPath: path))
    return path
}

@Suite("LoopCard fixture")
struct LoopCardTests {
    @Test func createsASparseAttachedCardOfTheRequestedSize() throws {
        let card = try LoopCard(label: "size check", size: 24 << 20)
        defer { card.close() }
        #expect(card.isAttached)
        #expect(card.deviceSize == 24 << 20)
        #expect(card.devicePath.hasPrefix("/dev/loop"))
        #expect(card.label == "size_check")
        let fileName = URL(fileURLWithPath: card.backingFile).lastPathComponent
        #expect(fileName.hasPrefix("provision-card-size_check-") && fileName.hasSuffix(".img"))
        var info = stat()
        #expect(stat(card.backingFile, &info) == 0)
        #expect(info.st_blocks == 0, "backing file is not sparse")
        #expect(card.diskSequence != nil)
    }

    @Test func usesDirectIOByDefaultAndReadOnlyOnRequest() throws {
        let card = try LoopCard(label: "ro", size: 8 << 20, options: .init(readOnly: true))
        defer { card.close() }
        let listing = try Command.check(["losetup", "--list", "--noheadings", "--output", "RO,DIO", card.devicePath])
        #expect(listing.stdout.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
            .map { $0.trimmingCharacters(in: .whitespacesAndNewlines) } == ["1", "1"])
        let write = try Command.run(["dd", "if=/dev/zero", "of=\(card.devicePath)", "bs=4096", "count=1",
                                     "oflag=direct", "status=none"])
        #expect(!write.succeeded)
        #expect(write.stderr.contains("Read-only file system") || write.stderr.contains("Operation not permitted"))
    }

    @Test func hashesWhatWasWrittenThroughTheDevice() throws {
        let directory = try TemporaryDirectory("provision-hash")
        defer { directory.remove() }
        let pattern = try patternFile(in: directory, size: 4 << 20)
        let card = try LoopCard(label: "hash", size: 8 << 20)
        defer { card.close() }
        let before = try card.sha256()
        try Command.check(["dd", "if=\(pattern)", "of=\(card.devicePath)", "bs=1M", "oflag=direct", "status=none"])
        let expected = try Command.check(["sha256sum", pattern]).stdout.prefix(64)
        #expect(try card.sha256(bytes: 4 << 20) == String(expected))
        #expect(try card.backingFileSHA256(bytes: 4 << 20) == String(expected))
        #expect(try card.sha256() != before)
        #expect(throws: LoopCardError.self) { try card.sha256(bytes: 1000) }
    }

    @Test func startsFromAnImageWhenGivenOne() throws {
        let directory = try TemporaryDirectory("provision-image")
        defer { directory.remove() }
        let pattern = try patternFile(in: directory, size: 1 << 20)
        let card = try LoopCard(label: "from-image", size: 4 << 20, image: pattern)
        defer { card.close() }
        #expect(card.deviceSize == 4 << 20)
        let expected = try Command.check(["sha256sum", pattern]).stdout.prefix(64)
        #expect(try card.sha256(bytes: 1 << 20) == String(expected))
    }

    @Test func throttleLimitsDirectWrites() throws {
        // 8 MiB at 4 MB/s is 2.1 s; ≥ 1.5 s leaves room for the throttle's first slice.
        let card = try LoopCard(label: "slow", size: 16 << 20)
        defer { card.close() }
        try card.throttle(writeBytesPerSecond: 4_000_000)
        let rule = try String(contentsOfFile: "/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device", encoding: .utf8)
        #expect(rule.contains("\(card.major):\(card.minor) 4000000"))
        let throttled = try timed {
            try Command.check(["dd", "if=/dev/zero", "of=\(card.devicePath)", "bs=1M", "count=8", "oflag=direct", "status=none"])
        }
        print("LoopCard: 8 MiB O_DIRECT write at a 4 MB/s throttle took \(throttled)")
        #expect(throttled >= .milliseconds(1500))

        try card.removeThrottle()
        let after = try String(contentsOfFile: "/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device", encoding: .utf8)
        #expect(!after.contains("\(card.major):\(card.minor) "))
        let free = try timed {
            try Command.check(["dd", "if=/dev/zero", "of=\(card.devicePath)", "bs=1M", "count=8", "oflag=direct", "status=none"])
        }
        print("LoopCard: the same write without the throttle took \(free)")
        #expect(free < throttled)
    }

    @Test func throttleLimitsDirectReads() throws {
        let card = try LoopCard(label: "slow-read", size: 16 << 20)
        defer { card.close() }
        try card.throttle(writeBytesPerSecond: nil, readBytesPerSecond: 4_000_000)
        let elapsed = try timed {
            try Command.check(["dd", "if=\(card.devicePath)", "of=/dev/null", "bs=1M", "count=8", "iflag=direct", "status=none"])
        }
        #expect(elapsed >= .milliseconds(1500))
    }

    @Test func detachIsIdempotentAndDropsTheThrottle() throws {
        let card = try LoopCard(label: "detach", size: 8 << 20)
        defer { card.close() }
        // An odd rate, so that the check below cannot see another test's throttle on a
        // card that got the same loop device after ours was detached.
        try card.throttle(writeBytesPerSecond: 1_234_567)
        try card.detach()
        #expect(!card.isAttached)
        let rules = try String(contentsOfFile: "/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device", encoding: .utf8)
        #expect(!rules.contains("\(card.major):\(card.minor) 1234567"))
        try card.detach()
        #expect(throws: LoopCardError.self) { try card.throttle(writeBytesPerSecond: 1) }
        #expect(throws: LoopCardError.self) { try card.sha256() }
        #expect(throws: LoopCardError.self) { try card.pull() }
    }

    @Test func closeDeletesTheBackingFile() throws {
        let card = try LoopCard(label: "close", size: 8 << 20)
        let file = card.backingFile
        card.close()
        #expect(!FileManager.default.fileExists(atPath: file))
        #expect(!card.isAttached)
        card.close()
    }

    @Test func showsThePartitionsOfAPartitionedImage() throws {
        let directory = try TemporaryDirectory("provision-partscan")
        defer { directory.remove() }
        let image = directory.path + "/gpt.img"
        try Command.check(["truncate", "--size=32M", image])
        try Command.check(["sfdisk", "--quiet", image], input: "label: gpt\n,8M\n,8M\n,\n")
        let card = try LoopCard(label: "gpt", size: 32 << 20, image: image, options: .init(partitionScan: true))
        defer { card.close() }
        for number in 1...3 {
            #expect(FileManager.default.fileExists(atPath: "/sys/block/\(card.name)/\(card.name)p\(number)"))
        }
        // A blank card has no partition table: not an error.
        let blank = try LoopCard(label: "blank", size: 8 << 20, options: .init(partitionScan: true))
        blank.close()
    }

    @Test func pullingTheCardFailsAWriterMidWriteAndKeepsWhatWasWritten() async throws {
        let directory = try TemporaryDirectory("provision-pull")
        defer { directory.remove() }
        let pattern = try patternFile(in: directory, size: 16 << 20)
        let card = try LoopCard(label: "pulled", size: 16 << 20)
        defer { card.close() }
        // 16 MiB at 1 MB/s takes 16 s: the pull lands in the middle. It is made from a thread
        // of its own as soon as 2 MiB are in: a poll on the concurrency pool, starved by the
        // other suites' blocking work, once woke after dd had finished (CI failed so).
        try card.throttle(writeBytesPerSecond: 1_000_000)
        // The writer starts on the same thread that waits for it, not from the pool.
        // The size is read on that thread right after the pull, while dd still holds the
        // device: once dd exits, the lazy detach frees loopN, and a parallel test may attach
        // another card to the same node (a full run once read 160 MiB here).
        let (sizeAfterPull, output) = try await offPool {
            let writer = StartedCommand(
                ["dd", "if=\(pattern)", "of=\(card.devicePath)", "bs=1M", "oflag=direct", "status=none"])
            try waitUntilWritten(card, bytes: 2 << 20)
            try card.pull()
            let size = card.deviceSize
            return (size, try writer.wait())
        }
        #expect(sizeAfterPull == 0)

        #expect(!output.succeeded)
        // The write the throttle was holding fails with EIO; had dd gone on, ENOSPC.
        #expect(output.stderr.contains("Input/output error") || output.stderr.contains("No space left on device"),
                "dd said: \(output.stderr)")
        #expect(!output.stderr.contains("16777216 bytes"), "dd finished before the pull")
        // What reached the card before the pull is still in the backing file.
        let firstMiB = try Command.check(["bash", "-c", "head -c 1048576 \"$1\" | sha256sum", "h", pattern])
            .stdout.prefix(64)
        #expect(try card.backingFileSHA256(bytes: 1 << 20) == String(firstMiB))
        // The writer has closed the device: the lazy detach completed.
        let detachDeadline = ContinuousClock.now.advanced(by: .seconds(60))
        while card.isAttached && ContinuousClock.now < detachDeadline { try await Task.sleep(for: .milliseconds(50)) }
        #expect(!card.isAttached)
    }

    @Test func plainLosetupDetachDoesNotStopAWriter() async throws {
        // Why pull() exists: losetup -d on a busy device only sets autoclear.
        let directory = try TemporaryDirectory("provision-lazy")
        defer { directory.remove() }
        let pattern = try patternFile(in: directory, size: 8 << 20)
        let card = try LoopCard(label: "lazy", size: 8 << 20)
        defer { card.close() }
        try card.throttle(writeBytesPerSecond: 4_000_000)
        let output = try await offPool {
            let writer = StartedCommand(
                ["dd", "if=\(pattern)", "of=\(card.devicePath)", "bs=1M", "oflag=direct", "status=none"])
            try waitUntilWritten(card, bytes: 1 << 20)
            try Command.check(["losetup", "--detach", card.devicePath])
            return try writer.wait()
        }
        #expect(output.succeeded, "\(output)")
        let expected = try Command.check(["sha256sum", pattern]).stdout.prefix(64)
        #expect(try card.backingFileSHA256() == String(expected))
    }

    @Test func aPulledCardThatNobodyHoldsLosesItsTagAtOnce() async throws {
        _ = try provisionGroupID()
        let udevd = try Udevd.ensureRunning()
        let rules = try udevd.installRules(Udevd.projectRuleFiles())
        defer { try? rules.remove() }
        let card = try LoopCard(label: "pulled-udev", size: 8 << 20)
        defer { card.close() }
        _ = try udevd.waitForProperties(of: card.devicePath) { $0["CURRENT_TAGS"]?.contains(":provision:") == true }
        try card.pull()
        // Nobody had it open: detached at once, and udev drops the tag.
        let properties = try udevd.waitForProperties(of: card.devicePath) {
            $0["CURRENT_TAGS"]?.contains(":provision:") == false
        }
        #expect(!Udevd.tags(from: properties["CURRENT_TAGS"]).contains("provision"))
        #expect(!card.isAttached)
    }
}

/// Waits until `bytes` have reached the card's (sparse) backing file: the writer has
/// the device open and is under way, however slowly the machine started it.
/// (A full parallel `make test` has shown a writer stall for 30 s right at the start of the
/// run, when every suite starts at once; hence the long wait and the diagnostics.)
/// Blocks: call it through `offPool`.
func waitUntilWritten(_ card: LoopCard, bytes: Int) throws {
    let deadline = ContinuousClock.now.advanced(by: .seconds(90))
    var info = stat()
    while stat(card.backingFile, &info) == 0, Int(info.st_blocks) * 512 < bytes, ContinuousClock.now < deadline {
        usleep(20_000)
    }
    guard Int(info.st_blocks) * 512 < bytes else { return }
    let rules = ["write", "read"].map { direction in
        (try? String(contentsOfFile: "/sys/fs/cgroup/blkio/blkio.throttle.\(direction)_bps_device", encoding: .utf8)) ?? "?"
    }
    let loops = (try? Command.run(["losetup", "--list", "--output", "NAME,DIO,BACK-FILE"]).stdout) ?? "?"
    throw WriterStalled(description: "the writer did not get going: \(Int(info.st_blocks) * 512) of \(bytes) bytes reached \(card.backingFile) on \(card.devicePath) (attached: \(card.isAttached)); throttle rules write [\(rules[0])] read [\(rules[1])]; loop devices:\n\(loops)")
}

struct WriterStalled: Error, CustomStringConvertible {
    let description: String
}

func timed(_ body: () throws -> Void) rethrows -> Duration {
    let start = ContinuousClock.now
    try body()
    return ContinuousClock.now - start
}
