#if canImport(Glibc)
import Glibc
#endif
import ControlProtocol
import Foundation
import Testing
import TestSupport

/// The whole appliance path with a real image (images/build-test-image): write, verify,
/// inject the unit's users, e2fsck; raw blobs placed and refused; checked with debugfs.
@Suite("Provisioning in the daemon", .serialized)
struct ProvisioningTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    /// The seed's Raspberry Pi layout (FAT32 boot 1–99 MiB, ext4 root from 100 MiB), raw.
    func testImage(_ bench: StationBench) throws -> String {
        try Command.check([Self.repository + "/images/build-test-image", "--out", bench.directory, "--size", "128MiB", "--compress", "none", "--quiet"], timeout: .seconds(120))
        return bench.directory + "/rpi-test.img"
    }

    func writeConfig(_ bench: StationBench, slot: String, profile: String) throws {
        let text = """
            [station]
            name = "provisioning-\(bench.token)"
            allow_loop_devices = true
            ledger = "\(bench.ledgerPath)"
            cache_dir = "\(bench.directory)/cache"
            inventory = "\(bench.directory)/inventory.toml"

            [profiles.p]
            \(profile)

            [[slots]]
            name = "\(slot)"
            match = "loop:*/provision-card-\(bench.label(slot))-*"
            profile = "p"

            """
        try text.write(toFile: bench.configPath, atomically: true, encoding: .utf8)
        try """
            name_pattern = "lab-{slot}-{seq:03}"
            password_export = "\(bench.directory)/passwords.tsv"
            """.write(toFile: bench.directory + "/inventory.toml", atomically: true, encoding: .utf8)
    }

    func rootFilesystem(_ card: LoopCard) -> String { card.devicePath + "?offset=\(100 << 20)" }

    @Test("a card is written, gets its own user (unit name from the inventory), and its root filesystem checks clean")
    func injectsUsersIntoEachCard() throws {
        let bench = try StationBench()
        defer { bench.close() }
        let image = try testImage(bench)
        try writeConfig(bench, slot: "U1", profile: """
            image = "\(image)"
            [profiles.p.root]
            partition = 2
            [[profiles.p.users]]
            name = "tech"
            groups = ["users"]
            password = "generate"
            ssh_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl tech@bench"]
            """)
        try bench.startDaemon()
        let card = try bench.card(slot: "U1", size: 160 << 20)
        let status = try bench.waitForStatus("U1 done", timeout: .seconds(120)) { $0.slot("U1")?.job?.state.isFinal == true }
        let job = try #require(status.slot("U1")?.job)
        #expect(job.state == .done, "\(job.message ?? "")")
        #expect(job.unit == "lab-U1-\(String(format: "%03lld", job.id))")
        #expect(try bench.statusLine(slot: "U1").contains(job.unit ?? "?"))
        // The ledger holds the user's name, uid and hash — and no password anywhere.
        let rows = try Command.check(["sqlite3", bench.ledgerPath, "SELECT name, uid, hash FROM jobUser WHERE jobId = \(job.id)"]).stdout
        #expect(rows.hasPrefix("tech|1000|$6$"), "\(rows)")
        let export = try String(contentsOfFile: bench.directory + "/passwords.tsv", encoding: .utf8)
        let password = try #require(export.split(separator: "\n").last?.split(separator: "\t").last.map(String.init))
        #expect(!rows.contains(password) && !bench.log.contains(password))
        // On the card, through peers: debugfs sees the entry, e2fsck finds nothing.
        let shadow = try Command.check(["debugfs", "-R", "cat /etc/shadow", rootFilesystem(card)]).stdout
        #expect(shadow.contains("tech:$6$"))
        let keys = try Command.check(["debugfs", "-R", "cat /home/tech/.ssh/authorized_keys", rootFilesystem(card)]).stdout
        #expect(keys.contains("tech@bench"))
        let fsck = try Command.run(["e2fsck", "-fn", rootFilesystem(card)])
        #expect(fsck.status == 0, "\(fsck.stdout)")
    }

    /// What the image itself says is checked before any card (issue 13, point 5): the daemon
    /// refuses to start on such a config, and `provision config check` says the same, with
    /// the file and line — no card is ever written for an injection bound to fail.
    func expectRefusedAtStart(_ bench: StationBench, line: Int, reason: String,
                              sourceLocation: SourceLocation = #_sourceLocation) throws {
        let check = try Command.run([DaemonProcess.cliBinary, "config", "check", bench.configPath])
        #expect(check.status == 78, "\(check)", sourceLocation: sourceLocation)
        #expect(check.stderr.contains("\(bench.configPath):\(line): ") && check.stderr.contains(reason), "\(check)",
                sourceLocation: sourceLocation)
        #expect(sourceLocation: sourceLocation) { try bench.startDaemon() } throws: { error in
            (error as? DaemonProcessError)?.description.contains("exited with status 78") == true
        }
        #expect(bench.log.contains(reason), "\(bench.log)", sourceLocation: sourceLocation)
    }

    @Test("a root partition that is vfat in the image is refused at start, before any card")
    func injectionIntoVfatIsRefusedAtStart() throws {
        let bench = try StationBench()
        defer { bench.close() }
        let image = try testImage(bench)
        try writeConfig(bench, slot: "U2", profile: """
            image = "\(image)"
            [profiles.p.root]
            partition = 1
            [[profiles.p.users]]
            name = "tech"
            password = "locked"
            """)
        try expectRefusedAtStart(bench, line: 10, reason: "partition 1 of \(image) is vfat, not ext4")
    }

    @Test("a raw blob lands at its offset and is verified with the image")
    func writesRawBlob() throws {
        let bench = try StationBench()
        defer { bench.close() }
        let image = try testImage(bench)
        let blob = (0..<20_000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        try Data(blob).write(to: URL(fileURLWithPath: bench.directory + "/spl.bin"))
        try writeConfig(bench, slot: "B1", profile: """
            image = "\(image)"
            [[profiles.p.blobs]]
            file = "\(bench.directory)/spl.bin"
            offset = 8192
            """)
        try bench.startDaemon()
        let card = try bench.card(slot: "B1", size: 160 << 20)
        let status = try bench.waitForStatus("B1 finished", timeout: .seconds(120)) { $0.slot("B1")?.job?.state.isFinal == true }
        #expect(status.slot("B1")?.job?.state == .done, "\(status.slot("B1")?.job?.message ?? "")")
        let onCard = try Command.check(["bash", "-c", "dd if=\(card.devicePath) iflag=direct bs=4096 skip=2 count=5 status=none | head -c 20000 | sha256sum"]).stdout
        let expected = try Command.check(["sha256sum", bench.directory + "/spl.bin"]).stdout
        #expect(onCard.prefix(64) == expected.prefix(64))
    }

    @Test("a blob that overlaps a partition of the image is refused at start, before any card")
    func refusesOverlappingBlob() throws {
        let bench = try StationBench()
        defer { bench.close() }
        let image = try testImage(bench)
        try Data(repeating: 0xEE, count: 4096).write(to: URL(fileURLWithPath: bench.directory + "/bad.bin"))
        try writeConfig(bench, slot: "B2", profile: """
            image = "\(image)"
            [[profiles.p.blobs]]
            file = "\(bench.directory)/bad.bin"
            offset = \(2 << 20)
            """)
        try expectRefusedAtStart(bench, line: 10, reason: "would overwrite partition 1")
    }
}
