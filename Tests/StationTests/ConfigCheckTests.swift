import Accounts
import Foundation
import Testing
@testable import Station
import TestSupport

/// Issue 13, point 5: every value that would break an account file, and every fact the
/// named files can tell, is refused by parsing/loading — what `provision config check`,
/// the daemon's start and its reload run — with the file, line and key to fix.
struct UserValueCheckTests {
    static let prefix = "name = \"board\"\nimage = \"a.img\"\n[root]\npartition = 2\n[[users]]\n"

    /// Parses a profile whose only user has `line` after `[[users]]` (line 5), expecting an error.
    func failure(_ line: String, name: String = "lab", sourceLocation: SourceLocation = #_sourceLocation) -> ConfigError? {
        let text = Self.prefix + "name = \"\(name)\"\n" + line + "\n"
        do {
            _ = try Profile.parse(toml: text, source: "board/profile.toml", baseDirectory: "/srv")
            Issue.record("expected an error for \(line)", sourceLocation: sourceLocation)
        } catch let error as ConfigError {
            return error
        } catch {
            Issue.record("unexpected error type: \(error)", sourceLocation: sourceLocation)
        }
        return nil
    }

    // One rule each: the value written in TOML (escapes as TOML reads them), the key the
    // error must name, and words of the reason.
    @Test(arguments: [
        ("home = \"/home/../../etc\"", "users[0].home", "\"..\""),
        ("home = \"/home/./lab\"", "users[0].home", "\"..\""),
        ("home = \"/home/lab\\nroot\"", "users[0].home", "newline"),
        ("home = \"/home/lab\\r\"", "users[0].home", "carriage return"),
        ("home = \"/home/la:b\"", "users[0].home", "':'"),
        ("home = \"home/lab\"", "users[0].home", "absolute"),
        ("home = \"/home//lab\"", "users[0].home", "empty component"),
        ("home = \"/home/lab/\"", "users[0].home", "empty component"),
        ("home = \"/home/\\u0001lab\"", "users[0].home", "control character"),
        ("shell = \"/bin/sh\\n\"", "users[0].shell", "newline"),
        ("shell = \"/bin:/sh\"", "users[0].shell", "':'"),
        ("shell = \"/bin/../bin/sh\"", "users[0].shell", "\"..\""),
        ("shell = \"/bin/\\u001bsh\"", "users[0].shell", "control character"),
        ("groups = [\"sudo\", \"a:b\"]", "users[0].groups[1]", "not a valid name"),
        ("groups = [\"sudo\\nroot\"]", "users[0].groups[0]", "not a valid name"),
        ("groups = [\"sudo\", \"sudo\"]", "users[0].groups[1]", "listed twice"),
        ("groups = [\"\"]", "users[0].groups[0]", "not a valid name"),
        ("gecos = \"Lab\\nevil::0:0::/:/bin/sh\"", "users[0].gecos", "newline"),
        ("gecos = \"a:b\"", "users[0].gecos", "':'"),
        ("gecos = \"a\\u007fb\"", "users[0].gecos", "control character"),
        ("ssh_keys = [\"ssh-ed25519 AAAA op\\nssh-rsa AAAA evil\"]", "users[0].ssh_keys[0]", "newline"),
        ("ssh_keys = [\"ssh-ed25519 AAAA op@bench\", \"not a key\"]", "users[0].ssh_keys[1]", "SSH public key"),
        ("ssh_keys = [\"ssh-ed25519 AA:AA op\"]", "users[0].ssh_keys[0]", "SSH public key"),
        ("ssh_keys = [\"\"]", "users[0].ssh_keys[0]", "SSH public key"),
        ("hash = \"$6$salt$\(String(repeating: "a", count: 86))\\n\"", "users[0].hash", "not an accepted crypt hash"),
        ("hash = \"$6$sa:lt$\(String(repeating: "a", count: 86))\"", "users[0].hash", "not an accepted crypt hash"),
        ("hash = \"$1$salt$md5\"", "users[0].hash", "method $1$"),
        ("uid = 0", "users[0].uid", "second root account"),
        ("uid = 999", "users[0].uid", "system range"),
        ("uid = 65534", "users[0].uid", "nobody"),
        ("uid = 62000", "users[0].uid", "dynamic-user"),
        ("uid = 65535", "users[0].uid", "not a usable uid"),
        ("uid = 4294967295", "users[0].uid", "not a usable uid"),
        ("uid = -1", "users[0].uid", "not a usable uid"),
        ("allow_system_uid = \"yes\"", "users[0].allow_system_uid", "expected a boolean"),
    ])
    func eachAccountRuleIsRefusedAtItsKey(line: String, keyPath: String, reason: String) throws {
        let error = try #require(failure(line))
        #expect(error.keyPath == keyPath, "\(error)")
        #expect(error.line == 7 || keyPath.hasSuffix("]"), "\(error)")
        #expect(error.line != nil, "\(error)")
        #expect(error.message.contains(reason), "\(error)")
        // Control characters are shown escaped, never raw: the message stays one line.
        #expect(!error.description.contains("\n") && !error.description.contains("\r"), "\(error)")
    }

    @Test(arguments: ["la:b", "lab\\n", "Lab", "0lab", "", String(repeating: "a", count: 33)])
    func badUserNamesAreRefused(name: String) throws {
        let error = try #require(failure("", name: name))
        #expect(error.keyPath == "users[0].name" && error.line == 6, "\(error)")
        #expect(error.message.contains("not a valid name"), "\(error)")
    }

    /// toml++ would cut "/home/lab\u0000/../../etc" to "/home/lab": silently another value.
    @Test func nulEscapeInAValueIsRefusedAtItsLine() throws {
        for escape in ["\\u0000", "\\U00000000"] {
            let error = try #require(failure("home = \"/home/lab\(escape)/../../etc\""))
            #expect(error.line == 7 && error.column == 18, "\(error)")
            #expect(error.message.contains("\\u0000 escape"), "\(error)")
        }
        // An escaped backslash before "u0000" is not an escape of NUL.
        let profile = try Profile.parse(toml: Self.prefix + "name = \"lab\"\ngecos = \"a\\\\u0000\"\n",
                                        source: "board/profile.toml", baseDirectory: "/srv")
        #expect(profile.users.first?.gecos == "a\\u0000")
    }

    @Test func systemUIDIsAcceptedWhenExplicitlyAllowed() throws {
        let profile = try Profile.parse(toml: Self.prefix + "name = \"admin\"\nuid = 0\nallow_system_uid = true\n",
                                        source: "board/profile.toml", baseDirectory: "/srv")
        let user = try #require(profile.users.first)
        #expect(user.uid == 0 && user.allowSystemUID)
        // The flag reaches the injector, which checks the same rule.
        #expect(user.userSpec.allowSystemUID)
        #expect(throws: Never.self) { try user.userSpec.check() }
        var withoutFlag = user.userSpec
        withoutFlag.allowSystemUID = false
        #expect(throws: UserSpec.Problem.self) { try withoutFlag.check() }
    }

    @Test func wellFormedValuesPass() throws {
        let profile = try Profile.parse(toml: Self.prefix + """
            name = "lab"
            uid = 1500
            groups = ["sudo", "video"]
            shell = "/bin/bash"
            home = "/srv/home/lab"
            gecos = "Lab user,Room 4,,"
            hash = "$y$j9T$abcdefghij$\(String(repeating: "A", count: 43))"
            ssh_keys = ["from=\\"10.0.0.0/8\\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB6m op@bench", "ssh-rsa AAAAB3Nza+/= x"]
            """, source: "board/profile.toml", baseDirectory: "/srv")
        #expect(profile.users.first?.home == "/srv/home/lab")
    }
}

/// The station config as a document: what would silently lose slots is an error.
struct StationDocumentCheckTests {
    static let slot = """
        [profiles.demo]
        image = "/srv/demo.img"

        [[slots]]
        name = "A1"
        match = "loop:*"
        profile = "demo"
        """

    func failure(_ text: String, sourceLocation: SourceLocation = #_sourceLocation) -> ConfigError? {
        do {
            let config = try StationConfig.parse(text: text, file: "station.toml")
            Issue.record("expected an error, parsed \(config.slots.count) slot(s)", sourceLocation: sourceLocation)
        } catch let error as ConfigError {
            return error
        } catch {
            Issue.record("unexpected error type: \(error)", sourceLocation: sourceLocation)
        }
        return nil
    }

    @Test func nulByteIsAnErrorAtItsLineAndColumn() throws {
        // toml++ would stop at the NUL and see a station without slots.
        let error = try #require(failure("[station]\nname = \"bench\"\nled\u{0}ger = \"x\"\n" + Self.slot))
        #expect(error.line == 3 && error.column == 4, "\(error)")
        #expect(error.message.contains("NUL byte"))
        #expect(error.description.hasPrefix("station.toml:3:4: "))
    }

    @Test func emptyFileIsAnError() throws {
        for text in ["", "\n\n  \t\n"] {
            let error = try #require(failure(text))
            #expect(error.message.contains("empty"), "\(error)")
        }
    }

    @Test func fileWithoutSlotsIsAnError() throws {
        for text in ["# only a comment\n", "[station]\nname = \"bench\"\n", "[profiles.demo]\nimage = \"/srv/demo.img\"\n"] {
            let error = try #require(failure(text))
            #expect(error.keyPath == "slots" && error.message.contains("no [[slots]]"), "\(error)")
        }
    }

    @Test func slotNameOrPatternWithAControlCharacterIsRefused() throws {
        let error = try #require(failure(Self.slot.replacingOccurrences(of: "name = \"A1\"", with: "name = \"A\\n1\"")))
        #expect(error.keyPath == "slots[0].name" && error.line == 5, "\(error)")
        #expect(error.message.contains("newline"))
    }

    @Test func stationNameAdminGroupAndDescriptionAreOneLine() throws {
        let name = try #require(failure("[station]\nname = \"bench\\n2\"\n" + Self.slot))
        #expect(name.keyPath == "station.name" && name.line == 2, "\(name)")
        let group = try #require(failure("[station]\nadmin_group = \"wheel:x\"\n" + Self.slot))
        #expect(group.keyPath == "station.admin_group" && group.line == 2, "\(group)")
        let description = try #require(failure(Self.slot.replacingOccurrences(of: "image = ", with: "description = \"a\\rb\"\nimage = ")))
        #expect(description.keyPath == "profiles.demo.description" && description.line == 2, "\(description)")
        #expect(description.message.contains("carriage return"))
    }

    @Test func rootLabelLongerThanAnExtLabelIsRefused() throws {
        let error = try #require(failure(Self.slot.replacingOccurrences(of: "image = \"/srv/demo.img\"", with: """
            image = "/srv/demo.img"
            [profiles.demo.root]
            label = "a-label-of-17-bytes"
            [[profiles.demo.users]]
            name = "lab"
            """)))
        #expect(error.keyPath == "profiles.demo.root.label" && error.line == 4, "\(error)")
        #expect(error.message.contains("1–16 bytes"))
    }

    @Test func notUTF8IsAnErrorWithItsPosition() throws {
        let scratch = try TemporaryDirectory("provision-config")
        defer { scratch.remove() }
        let path = try scratch.write("station.toml", Array("[station]\nname = \"b".utf8) + [0xFF, 0xFE] + Array("\"\n".utf8))
        #expect { _ = try StationConfig.load(file: path) } throws: { error in
            guard let error = error as? ConfigError else { return false }
            return error.line == 2 && error.message.contains("not UTF-8")
        }
    }

    @Test func missingFileSaysSo() throws {
        #expect { _ = try StationConfig.load(file: "/nonexistent/station.toml") } throws: { error in
            (error as? ConfigError)?.message.contains("no such file") == true
        }
    }
}

/// A small real disk image: MBR, partition 1 vfat "BOOT" (1–4 MiB), partition 2 ext4
/// "rootfs" (4–16 MiB); also zstd-compressed, and its bmap. Built with Debian's tools.
final class DiskFixture {
    let scratch: TemporaryDirectory
    var raw: String { scratch.file("disk.img") }
    var zst: String { scratch.file("disk.img.zst") }

    init() throws {
        scratch = try TemporaryDirectory("provision-config-check")
        let d = scratch.path
        let script = """
            set -e
            cd '\(d)'
            truncate -s 16M disk.img
            printf 'label: dos\\nstart=2048, size=6144, type=c\\nstart=8192, type=83\\n' | sfdisk --quiet disk.img
            mkfs.vfat -n BOOT -C boot.fs 3072 >/dev/null
            mkdir -p tree/etc tree/bin tree/home
            printf 'root:x:0:0:root:/root:/bin/sh\nlab:x:1000:1000::/home/lab:/bin/sh\n' > tree/etc/passwd
            printf 'root:*:19000:0:99999:7:::\nlab:!:19000:0:99999:7:::\n' > tree/etc/shadow
            printf 'root:x:0:\nusers:x:100:\nlab:x:1000:\n' > tree/etc/group
            printf 'root:*::\nusers:*::\nlab:!::\n' > tree/etc/gshadow
            printf '#!/bin/true\n' > tree/bin/sh && chmod 755 tree/bin/sh
            mkfs.ext4 -q -F -L rootfs -d tree root.fs 12M
            rm -r tree
            dd if=boot.fs of=disk.img bs=512 seek=2048 conv=notrunc status=none
            dd if=root.fs of=disk.img bs=512 seek=8192 conv=notrunc status=none
            rm boot.fs root.fs
            zstd -q disk.img -o disk.img.zst
            bmaptool -q create disk.img -o disk.img.bmap
            """
        let result = try Command.run(["bash", "-c", script])
        guard result.succeeded else { throw StationTestError(description: "building the disk fixture failed: \(result)") }
    }

    deinit { scratch.remove() }

    /// A profile file for `image` with `body` after the image line; relative paths resolve in the fixture.
    func profile(image: String, _ body: String) throws -> Profile {
        let text = "name = \"board\"\nimage = \"\(image)\"\n" + body
        return try Profile.parse(toml: text, source: "board/profile.toml", baseDirectory: scratch.path)
    }

    /// The ConfigError `checkFiles` throws.
    func checkFailure(_ profile: Profile, reach: UInt64 = Profile.partitionProbeReach,
                      sourceLocation: SourceLocation = #_sourceLocation) -> ConfigError? {
        do {
            try profile.checkFiles(reach: reach)
            Issue.record("expected checkFiles to fail", sourceLocation: sourceLocation)
        } catch let error as ConfigError {
            return error
        } catch {
            Issue.record("unexpected error type: \(error)", sourceLocation: sourceLocation)
        }
        return nil
    }
}

@Suite("config check against the files a profile names", .ownThread)
struct ProfileFileCheckTests {
    static let users = "[[users]]\nname = \"lab\"\n"

    @Test(arguments: ["disk.img", "disk.img.zst"])
    func rootByNumberLabelOrRolePasses(image: String) throws {
        let disk = try DiskFixture()
        try disk.profile(image: image, "[root]\npartition = 2\n" + Self.users).checkFiles()
        try disk.profile(image: image, "[root]\nlabel = \"rootfs\"\n" + Self.users).checkFiles()
        try disk.profile(image: image, """
            [[partitions]]
            number = 1
            role = "boot"
            filesystem = "vfat"
            start = "1MiB"
            size = "3MiB"
            [[partitions]]
            number = 2
            role = "root"
            filesystem = "ext4"
            start = "4MiB"
            """ + "\n" + Self.users).checkFiles()
    }

    @Test(arguments: ["disk.img", "disk.img.zst"])
    func rootPartitionTheImageDoesNotHaveIsRefused(image: String) throws {
        let disk = try DiskFixture()
        let error = try #require(disk.checkFailure(try disk.profile(image: image, "[root]\npartition = 3\n" + Self.users)))
        #expect(error.line == 3 && error.keyPath == "root", "\(error)")
        #expect(error.message.contains("no partition 3"), "\(error)")
    }

    @Test(arguments: ["disk.img", "disk.img.zst"])
    func rootPartitionThatIsNotExtIsRefused(image: String) throws {
        let disk = try DiskFixture()
        let error = try #require(disk.checkFailure(try disk.profile(image: image, "[root]\npartition = 1\n" + Self.users)))
        #expect(error.line == 3, "\(error)")
        #expect(error.message.contains("vfat") && error.message.contains("ext2/3/4"), "\(error)")
    }

    @Test func rootLabelTheImageDoesNotHaveIsRefused() throws {
        let disk = try DiskFixture()
        let error = try #require(disk.checkFailure(try disk.profile(image: "disk.img.zst", "[root]\nlabel = \"NIXOS_SD\"\n" + Self.users)))
        #expect(error.line == 3, "\(error)")
        #expect(error.message.contains("NIXOS_SD") && error.message.contains("rootfs"), "\(error)")
    }

    @Test func declaredPartitionAtAnotherPlaceIsRefused() throws {
        let disk = try DiskFixture()
        let error = try #require(disk.checkFailure(try disk.profile(image: "disk.img", """
            [[partitions]]
            number = 2
            role = "root"
            filesystem = "ext4"
            start = "8MiB"
            """ + "\n" + Self.users)))
        #expect(error.line == 3 && error.keyPath == "partitions[0]", "\(error)")
        #expect(error.message.contains("starts at byte 4194304"), "\(error)")
    }

    @Test func beyondTheProbeReachOnlyTheTableIsChecked() throws {
        let disk = try DiskFixture()
        // Partition 2 starts at 4 MiB: with a 2 MiB reach its label cannot be read from the
        // compressed image, so a label is not judged — but a missing number still is.
        try disk.profile(image: "disk.img.zst", "[root]\nlabel = \"other\"\n" + Self.users).checkFiles(reach: 2 << 20)
        let error = try #require(disk.checkFailure(try disk.profile(image: "disk.img.zst", "[root]\npartition = 4\n" + Self.users),
                                                   reach: 2 << 20))
        #expect(error.message.contains("no partition 4"), "\(error)")
    }

    @Test func missingImageIsRefusedAtTheImageLine() throws {
        let disk = try DiskFixture()
        let error = try #require(disk.checkFailure(try disk.profile(image: "gone.img.zst", "")))
        #expect(error.line == 2 && error.keyPath == "image", "\(error)")
        #expect(error.message.contains("not found") && error.message.contains("gone.img.zst"), "\(error)")
    }

    @Test func imageThatIsADirectoryIsRefused() throws {
        let disk = try DiskFixture()
        try FileManager.default.createDirectory(atPath: disk.scratch.file("dir.img"), withIntermediateDirectories: false)
        let error = try #require(disk.checkFailure(try disk.profile(image: "dir.img", "")))
        #expect(error.line == 2 && error.message.contains("not a regular file"), "\(error)")
    }

    @Test func corruptCompressedImageIsRefused() throws {
        let disk = try DiskFixture()
        // zstd's magic, then garbage: decoding fails in the first MiB.
        _ = try disk.scratch.write("bad.img.zst", [0x28, 0xB5, 0x2F, 0xFD] + [UInt8](repeating: 0xA5, count: 4096))
        let error = try #require(disk.checkFailure(try disk.profile(image: "bad.img.zst", "")))
        #expect(error.line == 2 && error.message.contains("zstd"), "\(error)")
    }

    @Test func namedBmapThatIsMissingIsRefused() throws {
        let disk = try DiskFixture()
        let error = try #require(disk.checkFailure(try disk.profile(image: "disk.img", "bmap = \"other.bmap\"\n")))
        #expect(error.line == 2 && error.message.contains("other.bmap"), "\(error)")
    }

    @Test func bmapOfAnotherImageIsRefused() throws {
        let disk = try DiskFixture()
        let other = disk.scratch.file("other.img")
        let made = try Command.run(["bash", "-c", "truncate -s 8M '\(other)' && bmaptool -q create '\(other)' -o '\(other).bmap'"])
        #expect(made.succeeded, "\(made)")
        let error = try #require(disk.checkFailure(try disk.profile(image: "disk.img.zst", "bmap = \"other.img.bmap\"\n")))
        #expect(error.line == 2 && error.message.contains("belongs to a different image"), "\(error)")
        // The bmap found next to the image (bmaptool's rule) is checked the same way.
        try disk.profile(image: "disk.img.zst", "").checkFiles()
    }

    @Test func bmapThatDoesNotParseIsRefused() throws {
        let disk = try DiskFixture()
        _ = try disk.scratch.write("broken.bmap", "<?xml version=\"1.0\"?><bmap version=\"2.0\"><ImageSize>12</Image")
        let error = try #require(disk.checkFailure(try disk.profile(image: "disk.img", "bmap = \"broken.bmap\"\n")))
        #expect(error.line == 2 && error.message.contains("broken.bmap"), "\(error)")
    }

    @Test func usersIntoAnImageWithoutPartitionTableAreRefused() throws {
        let disk = try DiskFixture()
        _ = try disk.scratch.write("flat.img", [UInt8](repeating: 0, count: 1 << 20))
        let error = try #require(disk.checkFailure(try disk.profile(image: "flat.img", "[root]\npartition = 2\n" + Self.users)))
        #expect(error.line == 3 && error.message.contains("partition table"), "\(error)")
    }
}

@Suite("station config load: the profiles' files and the inventory", .ownThread)
struct StationFileCheckTests {
    func station(_ disk: DiskFixture, _ body: String) throws -> String {
        try disk.scratch.write("station.toml", "[station]\nname = \"bench\"\nledger = \"l.sqlite\"\n" + body)
    }

    static let slot = "[[slots]]\nname = \"A1\"\nmatch = \"loop:*\"\nprofile = \"demo\"\n"

    func loadFailure(_ path: String, sourceLocation: SourceLocation = #_sourceLocation) -> ConfigError? {
        do {
            _ = try StationConfig.load(file: path)
            Issue.record("expected load to fail", sourceLocation: sourceLocation)
        } catch let error as ConfigError {
            return error
        } catch {
            Issue.record("unexpected error type: \(error)", sourceLocation: sourceLocation)
        }
        return nil
    }

    @Test func sizesThatRefuseEveryCardAreRefusedAtLoad() throws {
        let disk = try DiskFixture()
        let tooSmall = try station(disk, "max_device_size = \"1MiB\"\n[profiles.demo]\nimage = \"disk.img.zst\"\n" + Self.slot)
        let small = try #require(loadFailure(tooSmall))
        #expect(small.keyPath == "profiles.demo.image" && small.message.contains("more than the station's max_device_size 1 MiB"), "\(small)")
        let minimum = try station(disk, "max_device_size = \"1GiB\"\n[profiles.demo]\nimage = \"disk.img.zst\"\nmin_device_size = \"1TiB\"\n" + Self.slot)
        let above = try #require(loadFailure(minimum))
        #expect(above.message.contains("min_device_size 1 TiB is above the station's max_device_size 1 GiB"), "\(above)")
    }

    @Test func slotProfileWithAMissingImageFailsLoadButNotParse() throws {
        let disk = try DiskFixture()
        let path = try station(disk, "[profiles.demo]\nimage = \"missing.img\"\n" + Self.slot)
        let text = try String(contentsOfFile: path, encoding: .utf8)
        _ = try StationConfig.parse(text: text, file: path)
        let error = try #require(loadFailure(path))
        #expect(error.line == 5 && error.keyPath == "profiles.demo.image", "\(error)")
    }

    @Test func inlineRootPartitionIsCheckedAgainstTheImage() throws {
        let disk = try DiskFixture()
        let path = try station(disk, """
            [profiles.demo]
            image = "disk.img.zst"
            [profiles.demo.root]
            partition = 5
            [[profiles.demo.users]]
            name = "lab"
            password = "locked"

            """ + Self.slot)
        let error = try #require(loadFailure(path))
        #expect(error.line == 6 && error.message.contains("no partition 5"), "\(error)")
        #expect(error.description.hasPrefix(path + ":6: "))
    }

    @Test func unusedCatalogProfileWithMissingFilesOnlyWarns() throws {
        let disk = try DiskFixture()
        let tree = disk.scratch.file("images")
        for (name, image) in [("used", disk.raw), ("unbuilt", disk.scratch.file("unbuilt.img.xz"))] {
            try FileManager.default.createDirectory(atPath: tree + "/" + name, withIntermediateDirectories: true)
            _ = try disk.scratch.write("images/\(name)/profile.toml", "name = \"\(name)\"\nimage = \"\(image)\"\n")
        }
        let path = try station(disk, "profiles_dir = \"images\"\n[[slots]]\nname = \"A1\"\nmatch = \"loop:*\"\nprofile = \"used\"\n")
        let config = try StationConfig.load(file: path)
        #expect(config.warnings.count == 1)
        #expect(config.warnings.first?.file.hasSuffix("images/unbuilt/profile.toml") == true, "\(config.warnings)")
        // Used by a slot, the same profile is an error.
        let strict = try station(disk, "profiles_dir = \"images\"\n[[slots]]\nname = \"A1\"\nmatch = \"loop:*\"\nprofile = \"unbuilt\"\n")
        let error = try #require(loadFailure(strict))
        #expect(error.file.hasSuffix("images/unbuilt/profile.toml") && error.line == 2, "\(error)")
    }

    @Test func badInventoryValueFailsTheLoadAtTheInventoryKey() throws {
        let disk = try DiskFixture()
        _ = try disk.scratch.write("inventory.toml", """
            [[users]]
            name = "lab"
            password = "locked"
            [serial."3a5f".users.lab]
            home = "/home/../../etc"
            """)
        let path = try station(disk, "inventory = \"inventory.toml\"\n[profiles.demo]\nimage = \"disk.img\"\n" + Self.slot)
        let error = try #require(loadFailure(path))
        #expect(error.line == 4 && error.keyPath == "station.inventory", "\(error)")
        #expect(error.message.contains("[serial.\"3a5f\".users.lab]") && error.message.contains("\"..\""), "\(error)")
    }

    @Test func missingInventoryFailsTheLoad() throws {
        let disk = try DiskFixture()
        let path = try station(disk, "inventory = \"nowhere.toml\"\n[profiles.demo]\nimage = \"disk.img\"\n" + Self.slot)
        let error = try #require(loadFailure(path))
        #expect(error.keyPath == "station.inventory" && error.message.contains("nowhere.toml"), "\(error)")
    }

    @Test func passwordExportThatWouldBeRefusedFailsTheLoad() throws {
        let disk = try DiskFixture()
        let base = "[profiles.demo]\nimage = \"disk.img\"\n" + Self.slot
        // The station's export: a directory that does not exist.
        let missingDirectory = try station(disk, "password_export = \"nodir/passwords.tsv\"\n" + base)
        let error = try #require(loadFailure(missingDirectory))
        #expect(error.keyPath == "station.password_export" && error.line == 4, "\(error)")
        #expect(error.message.contains("does not exist"), "\(error)")
        // The inventory's export (it wins over the station's): readable by others.
        let loose = try disk.scratch.write("loose.tsv", "", mode: 0o644)
        _ = try disk.scratch.write("inventory.toml", "password_export = \"\(loose)\"\n[[users]]\nname = \"lab\"\npassword = \"generate\"\n")
        let viaInventory = try station(disk, "inventory = \"inventory.toml\"\npassword_export = \"nodir/p.tsv\"\n" + base)
        let inventoryError = try #require(loadFailure(viaInventory))
        #expect(inventoryError.keyPath == "station.inventory" && inventoryError.message.contains("mode 644"), "\(inventoryError)")
        // A file that does not exist yet in an existing directory is fine.
        _ = try StationConfig.load(file: try station(disk, "password_export = \"new.tsv\"\n" + base))
    }

    /// What only the image's /etc can tell, for a raw image: the injection is rehearsed.
    @Test func injectionTheRawImageRefusesFailsTheLoadAtTheUser() throws {
        let disk = try DiskFixture()
        func config(_ image: String, _ user: String) throws -> String {
            try station(disk, "[profiles.demo]\nimage = \"\(image)\"\n[profiles.demo.root]\npartition = 2\n" + user + Self.slot)
        }
        let good = try config("disk.img", "[[profiles.demo.users]]\nname = \"tech\"\npassword = \"locked\"\ngroups = [\"users\"]\n")
        #expect(try StationConfig.load(file: good).warnings.isEmpty)
        let missingGroup = try config("disk.img", "[[profiles.demo.users]]\nname = \"tech\"\npassword = \"locked\"\ngroups = [\"gpio\"]\n")
        let error = try #require(loadFailure(missingGroup))
        #expect(error.line == 8 && error.keyPath == "profiles.demo.users[0]", "\(error)")
        #expect(error.message.contains("would fail") && error.message.contains("gpio"), "\(error)")
        let takenUID = try config("disk.img", "[[profiles.demo.users]]\nname = \"tech\"\npassword = \"locked\"\nuid = 1000\n")
        #expect(try #require(loadFailure(takenUID)).message.contains("already used by lab"))
        let missingShell = try config("disk.img", "[[profiles.demo.users]]\nname = \"tech\"\npassword = \"locked\"\nshell = \"/bin/zsh\"\n")
        #expect(try #require(loadFailure(missingShell)).message.contains("/bin/zsh"))
        // A compressed image is not decompressed that far: only its partitions are checked.
        _ = try StationConfig.load(file: try config("disk.img.zst", "[[profiles.demo.users]]\nname = \"tech\"\npassword = \"locked\"\ngroups = [\"gpio\"]\n"))
    }

    @Test func goodStationLoads() throws {
        let disk = try DiskFixture()
        _ = try disk.scratch.write("inventory.toml", "name_pattern = \"lab-{seq:03}\"\npassword_export = \"passwords.tsv\"\n[[users]]\nname = \"lab\"\npassword = \"generate\"\n")
        let path = try station(disk, """
            inventory = "inventory.toml"
            [profiles.demo]
            image = "disk.img.zst"
            [profiles.demo.root]
            label = "rootfs"
            [[profiles.demo.users]]
            name = "pi"

            """ + Self.slot)
        let config = try StationConfig.load(file: path)
        #expect(config.slots.count == 1 && config.warnings.isEmpty)
    }
}

/// `unread_output_timeout`: how long a control client may leave replies unread.
struct UnreadOutputTimeoutTests {
    func parse(_ line: String) throws -> StationConfig {
        try StationConfig.parse(text: "[station]\nname = \"t\"\n\(line)\n" + StationDocumentCheckTests.slot, file: "station.toml")
    }

    @Test func defaultsToTenSecondsAndTakesAValue() throws {
        #expect(try parse("").unreadOutputTimeout == 10)
        #expect(try parse("unread_output_timeout = 120").unreadOutputTimeout == 120)
    }

    @Test(arguments: ["unread_output_timeout = 0", "unread_output_timeout = 3601", "unread_output_timeout = \"10s\""])
    func outOfRangeOrNotANumberIsRefusedNamingTheKey(_ line: String) {
        do {
            _ = try parse(line)
            Issue.record("\(line) was accepted")
        } catch {
            #expect(error is ConfigError && "\(error)".contains("unread_output_timeout"), "\(error)")
        }
    }
}
