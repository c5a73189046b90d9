@testable import BlockDevices
import Foundation
import Testing
import TestSupport

/// The safety policy against real devices: loop cards made here, and the machine's own
/// system disk (only its facts are read; nothing is ever opened for writing).
@Suite("Safety policy", .serialized)
struct SafetyPolicyTests {
    let offline = SafetyPolicy(mode: .offline)

    func sh(_ args: String...) throws -> String {
        let r = try Command.run(args)
        guard r.succeeded else { throw PolicyTestError(description: r.description) }
        return r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// `mkfs` (a command line, the device appended) on `device`, then mounted for `body` at a
    /// new directory named `name` (a random suffix added) under the temporary directory;
    /// unmounted and removed after.
    func mounted(_ device: String, mkfs: [String], name: String = "provision-mnt-", _ body: (String) throws -> Void) throws {
        guard try Command.run(mkfs + [device]).succeeded else { throw PolicyTestError(description: "\(mkfs) \(device) failed") }
        let mnt = FileManager.default.temporaryDirectory.appendingPathComponent(name + UUID().uuidString.prefix(6)).path
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: mnt) }
        _ = try sh("mount", device, mnt)
        defer { _ = try? sh("umount", mnt) }
        try body(mnt)
    }

    @Test("a plain loop card passes offline, and in the station only when loop devices are enabled")
    func acceptsLoopCard() throws {
        let card = try LoopCard(label: "ok", size: 16 << 20)
        defer { card.close() }
        let facts = try DeviceFacts.read(path: card.devicePath)
        #expect(facts.size == 16 << 20 && !facts.isPartition && facts.isLoop)
        #expect(offline.refusals(for: facts, minimumSize: 1 << 20).isEmpty)
        #expect(SafetyPolicy(mode: .station(allowLoopDevices: true)).refusals(for: facts, minimumSize: nil).isEmpty)
        #expect(SafetyPolicy(mode: .station(allowLoopDevices: false)).refusals(for: facts, minimumSize: nil).map(\.rule) == [.notEligible])
    }

    @Test("refuses the disk that holds /")
    func refusesSystemDisk() throws {
        let root = try sh("findmnt", "-n", "-o", "SOURCE", "/")
        let parent = try sh("lsblk", "-n", "-d", "-o", "PKNAME", root)
        let disk = parent.isEmpty ? root : "/dev/" + parent
        let facts = try DeviceFacts.read(path: disk)
        let refusals = offline.refusals(for: facts, minimumSize: nil)
        #expect(refusals.contains { $0.rule == .inUse && $0.reason.contains("holds /") }, "\(refusals)")
        #expect(refusals.contains { $0.rule == .notEligible }, "a fixed virtio disk is not a card: \(refusals)")
    }

    @Test("refuses a mounted card, naming the mount point")
    func refusesMountedCard() throws {
        let card = try LoopCard(label: "mounted", size: 16 << 20)
        defer { card.close() }
        try mounted(card.devicePath, mkfs: ["mkfs.ext4", "-q", "-F"]) { mnt in
            let refusals = offline.refusals(for: try DeviceFacts.read(path: card.devicePath), minimumSize: nil)
            #expect(refusals.contains { $0.rule == .inUse && $0.reason.contains("mounted at \(mnt)") }, "\(refusals)")
        }
    }

    @Test("refuses every card when the system's mounts cannot be read, naming the file and the error")
    func refusesWhenMountsAreUnknown() throws {
        let card = try LoopCard(label: "unknown", size: 16 << 20)
        defer { card.close() }
        let facts = try DeviceFacts.read(path: card.devicePath)
        let missing = "/nonexistent-provision-test/mountinfo"
        let directory = FileManager.default.temporaryDirectory.path  // opens, but read() says EISDIR
        for path in [missing, directory] {
            let usage = SystemDiskUsage.current(mountinfo: path)
            #expect(usage.unreadable.count == 1 && usage.unreadable[0].hasPrefix("cannot read \(path) ("), "\(usage.unreadable)")
            let refusals = offline.refusals(for: facts, minimumSize: nil, usage: usage)
            #expect(refusals.map(\.rule) == [.inUse] && refusals[0].reason.contains("cannot tell whether it is in use: cannot read \(path)"), "\(refusals)")
        }
        #expect(SystemDiskUsage.current(mountinfo: missing).unreadable == ["cannot read \(missing) (No such file or directory)"])
        // /proc/swaps is missing on a kernel without swap, which then has none: not a refusal.
        // Any other error is.
        #expect(SystemDiskUsage.current(swaps: missing).unreadable.isEmpty)
        #expect(offline.refusals(for: facts, minimumSize: nil, usage: .current(swaps: missing)).isEmpty)
        #expect(SystemDiskUsage.current(swaps: directory).unreadable == ["cannot read \(directory) (Is a directory)"])
    }

    @Test("mountinfo lines: device number, mount point unescaped, a /dev source after the optional fields")
    func parsesMountInfo() {
        let text = """
            36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
            43 27 0:39 / /tmp/a\\040b\\011c\\134d rw,relatime shared:5 unbindable - btrfs /dev/loop1 rw,subvol=/
            25 1 0:22 / /dev/shm rw - tmpfs tmpfs rw
            26 1 0:23 / /x\\9 rw - fuse.fake /dev/fuse rw

            """
        #expect(MountInfo.parse(Array(text.utf8)) == [
            MountInfo(device: makeDevnum(98, 0), point: "/mnt2", source: "/dev/root"),
            MountInfo(device: nil, point: "/tmp/a b\tc\\d", source: "/dev/loop1"),
            MountInfo(device: nil, point: "/dev/shm", source: nil),
            MountInfo(device: nil, point: "/x\\9", source: "/dev/fuse"),
        ])
    }

    @Test("names a mount point with a space, a tab and a backslash as it is (mountinfo writes them \\040, \\011, \\134)")
    func namesEscapedMountPoint() throws {
        let card = try LoopCard(label: "escaped", size: 16 << 20)
        defer { card.close() }
        try mounted(card.devicePath, mkfs: ["mkfs.ext4", "-q", "-F"], name: "provision mnt\t\\") { mnt in
            let refusals = offline.refusals(for: try DeviceFacts.read(path: card.devicePath), minimumSize: nil)
            #expect(refusals.contains { $0.rule == .inUse && $0.reason == "in use: mounted at \(mnt)" }, "\(refusals)")
        }
    }

    @Test("refuses a mounted btrfs card, whose mountinfo line names no device number (0:N) but its source")
    func refusesMountedBtrfsCard() throws {
        let card = try LoopCard(label: "btrfs", size: 128 << 20)
        defer { card.close() }
        try mounted(card.devicePath, mkfs: ["mkfs.btrfs", "-q", "-f"]) { mnt in
            // The premise: the kernel's line for this mount has major 0, so only SOURCE names the card.
            let line = try String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8).split(separator: "\n").first { $0.split(separator: " ")[4] == mnt }
            try #require(line?.split(separator: " ")[2].hasPrefix("0:") == true, "btrfs mount line: \(line ?? "none")")
            let refusals = offline.refusals(for: try DeviceFacts.read(path: card.devicePath), minimumSize: nil)
            #expect(refusals.contains { $0.rule == .inUse && $0.reason.contains("mounted at \(mnt)") }, "\(refusals)")
        }
    }

    @Test("refuses a partition, and the whole disk when one of its partitions is mounted")
    func refusesPartitionAndItsMountedDisk() throws {
        let card = try LoopCard(label: "parts", size: 32 << 20, options: .init(partitionScan: true))
        defer { card.close() }
        _ = try Command.run(["sfdisk", "--quiet", card.devicePath], input: "label: dos\n,16M,L\n,,L\n")
        try card.rescanPartitions()
        _ = try sh("udevadm", "settle", "--timeout=5")
        let part = card.devicePath + "p1"
        try #require(FileManager.default.fileExists(atPath: part), "partition node \(part) did not appear")
        let partFacts = try DeviceFacts.read(path: part)
        #expect(offline.refusals(for: partFacts, minimumSize: nil).contains { $0.rule == .partition })

        try mounted(part, mkfs: ["mkfs.ext4", "-q"]) { mnt in
            let diskRefusals = offline.refusals(for: try DeviceFacts.read(path: card.devicePath), minimumSize: nil)
            #expect(diskRefusals.contains { $0.rule == .inUse && $0.reason.contains(mnt) }, "\(diskRefusals)")
        }
    }

    @Test("refuses a write-protected card")
    func refusesReadOnly() throws {
        let card = try LoopCard(label: "ro", size: 16 << 20, options: .init(readOnly: true))
        defer { card.close() }
        let refusals = offline.refusals(for: try DeviceFacts.read(path: card.devicePath), minimumSize: nil)
        #expect(refusals.map(\.rule) == [.readOnly])
        #expect(refusals[0].reason.contains("write-protected"))
    }

    @Test("refuses a card smaller than the image, with both sizes")
    func refusesTooSmall() throws {
        let card = try LoopCard(label: "small", size: 16 << 20)
        defer { card.close() }
        let refusals = offline.refusals(for: try DeviceFacts.read(path: card.devicePath), minimumSize: 20 << 20)
        #expect(refusals.map(\.reason) == ["card too small: image needs \(20 << 20) bytes, card has \(16 << 20)"])
    }

    @Test("refuses a device larger than the station maximum")
    func refusesTooLarge() throws {
        let card = try LoopCard(label: "large", size: 64 << 20)
        defer { card.close() }
        let policy = SafetyPolicy(mode: .offline, maxDeviceSize: 32 << 20)
        #expect(policy.refusals(for: try DeviceFacts.read(path: card.devicePath), minimumSize: nil).map(\.rule) == [.tooLarge])
    }

    @Test("refuses a device with holders (device-mapper, md, LVM)")
    func refusesHeldDevice() throws {
        // No device-mapper driver on the test machines: the holder list is set on real facts.
        let card = try LoopCard(label: "held", size: 16 << 20)
        defer { card.close() }
        var facts = try DeviceFacts.read(path: card.devicePath)
        #expect(facts.holders.isEmpty)
        facts.holders = ["dm-0"]
        #expect(offline.refusals(for: facts, minimumSize: nil).contains { $0.rule == .inUse && $0.reason.contains("dm-0") })
    }

    @Test("a partition's holders count as the disk's: sysfs names them only under the partition")
    func partitionHoldersAreTheDisks() throws {
        // The layout of /sys/block/sdb with dm-0 on sdb1 (no device-mapper here to make one).
        let sys = try TemporaryDirectory("provision-sysfs")
        let fm = FileManager.default
        for dir in ["holders", "sdb1/holders/dm-0", "sdb2/holders", "queue"] {
            try fm.createDirectory(atPath: sys.file(dir), withIntermediateDirectories: true)
        }
        for file in ["sdb1/partition", "sdb2/partition", "size"] { #expect(fm.createFile(atPath: sys.file(file), contents: Data("1\n".utf8))) }
        #expect(DeviceFacts.holders(ofDiskAt: sys.path) == ["sdb1: dm-0"])
        try fm.createDirectory(atPath: sys.file("holders/md0"), withIntermediateDirectories: true)
        #expect(DeviceFacts.holders(ofDiskAt: sys.path) == ["md0", "sdb1: dm-0"])
        // A real loop card has none.
        let card = try LoopCard(label: "parts", size: 16 << 20, options: .init(partitionScan: true))
        defer { card.close() }
        #expect(try DeviceFacts.read(path: card.devicePath).holders.isEmpty)
    }

    @Test("an empty reader slot (size 0) is 'no medium'")
    func refusesEmptySlot() throws {
        let card = try LoopCard(label: "empty", size: 16 << 20)
        defer { card.close() }
        var facts = try DeviceFacts.read(path: card.devicePath)
        facts.size = 0
        #expect(offline.refusals(for: facts, minimumSize: nil).map(\.rule) == [.noMedium])
    }

    @Test("sizes parse the way operators write them")
    func parsesSizes() throws {
        #expect(try ByteCount.parse("512GiB") == 512 << 30)
        #expect(try ByteCount.parse("4MiB") == 4 << 20)
        #expect(try ByteCount.parse("1G") == 1 << 30)
        #expect(try ByteCount.parse("100") == 100)
        #expect(throws: ByteCount.ParseError.self) { try ByteCount.parse("12 parsecs") }
        #expect(ByteCount.human(32 << 20) == "32 MiB")
    }
}

struct PolicyTestError: Error, CustomStringConvertible { let description: String }
