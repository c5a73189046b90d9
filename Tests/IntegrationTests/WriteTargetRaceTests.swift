#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import Testing
import TestSupport

/// `provision write` opens its target first and makes every check on the descriptor: a path
/// that flips between a regular file and a symlink to a partition (an attacker's race, or a
/// script's mistake) never gets the partition written.
@Suite("provision write: target races")
struct WriteTargetRaceTests {
    @Test("a target flipping between a file and a symlink to a partition: the partition is never written")
    func flippingTargetNeverWritesThePartition() throws {
        let card = try LoopCard(label: "toctou", size: 16 << 20, options: .init(partitionScan: true))
        defer { card.close() }
        try Command.check(["sh", "-c", "printf 'label: dos\\n,8MiB\\n' | sfdisk -q '\(card.devicePath)'"])
        try card.rescanPartitions()
        let partition = card.devicePath + "p1"
        #expect(FileManager.default.fileExists(atPath: partition))
        let before = try Command.check(["sha256sum", partition]).stdout.prefix(64)

        let scratch = try TemporaryDirectory("provision-toctou")
        let image = try scratch.write("image.img", (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) })
        let target = scratch.file("target.img")
        FileManager.default.createFile(atPath: target, contents: nil)

        // Flip the path as fast as the kernel allows: rename(2) replaces it atomically with
        // a symlink to the partition, then with a fresh regular file, and so on.
        let stop = Atomic<Bool>(false)
        let flips = Atomic<Int>(0)
        let flipper = Thread {
            let link = scratch.file("flip-link"), file = scratch.file("flip-file")
            while !stop.load(ordering: .relaxed) {
                unlink(link)
                symlink(partition, link)
                rename(link, target)
                let fd = open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
                if fd >= 0 { close(fd) }
                rename(file, target)
                flips.add(1, ordering: .relaxed)
            }
        }
        flipper.start()
        defer { stop.store(true, ordering: .relaxed) }

        var wroteFile = 0, refusedLink = 0, other: [String] = []
        for _ in 0..<40 {
            let r = try Command.run([DaemonProcess.cliBinary, "write", "--yes", "--nobmap", image, target], timeout: .seconds(60))
            if r.succeeded { wroteFile += 1 }
            else if r.stderr.contains("symbolic link") { refusedLink += 1 }
            else { other.append(r.description) }
        }
        stop.store(true, ordering: .relaxed)
        let after = try Command.check(["sha256sum", partition]).stdout.prefix(64)
        #expect(after == before, "the partition was written through the symlink")
        #expect(other.isEmpty, "every run either writes the file or refuses the link: \(other)")
        // Both sides of the race must have been met, or this test tested nothing.
        #expect(flips.load(ordering: .relaxed) > 100)
        #expect(wroteFile > 0 && refusedLink > 0, "files written \(wroteFile), links refused \(refusedLink)")
    }

    @Test("a symlink target is refused by name; --follow-symlinks writes where it points, checked on the descriptor")
    func symlinkTargetNeedsConsent() throws {
        let scratch = try TemporaryDirectory("provision-symlink")
        let image = try scratch.write("image.img", [UInt8](repeating: 0xA5, count: 64 << 10))
        let real = scratch.file("real.img")
        FileManager.default.createFile(atPath: real, contents: nil)
        let link = scratch.file("link.img")
        symlink(real, link)
        let refused = try Command.run([DaemonProcess.cliBinary, "write", "--yes", "--nobmap", image, link])
        #expect(refused.status == 64, "\(refused)")
        #expect(refused.stderr.contains("is a symbolic link") && refused.stderr.contains("--follow-symlinks"), "\(refused.stderr)")
        #expect((try FileManager.default.attributesOfItem(atPath: real))[.size] as? Int == 0, "nothing may be written through a refused link")
        let followed = try Command.run([DaemonProcess.cliBinary, "write", "--yes", "--nobmap", "--follow-symlinks", image, link])
        #expect(followed.succeeded, "\(followed)")
        #expect(try Command.check(["cmp", image, real]).succeeded)
    }
}
