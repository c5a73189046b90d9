import Foundation
import Testing
@testable import Accounts
import TestSupport

/// Every refusal leaves the card byte-identical: the sha256 of the whole image before
/// and after must match, and the error must say what to fix.
@Suite("Injection failures leave the card unchanged", .serialized)
struct InjectorFailureTests {
    static let user = UserSpec(name: "lab", password: .generate(PasswordPolicy()))

    func expectUnchanged(_ image: DiskImage, root: RootLocator = .partition(2), users: [UserSpec] = [Self.user],
                         code: AccountsError.Code, message: String) throws {
        let before = try sha256(image.path)
        #expect {
            _ = try Injector.inject(target: image.path, root: root, users: users)
        } throws: { error in
            guard let e = error as? AccountsError else { return false }
            return e.code == code && e.message.contains(message)
        }
        #expect(try sha256(image.path) == before)
    }

    @Test("an ext4 root with mmp is refused by the rehearsal that config check runs, as by the injection, naming the feature")
    func mmpIsRefusedByTheRehearsalToo() throws {
        var options = DiskImage.Options()
        options.mkfsArguments = ["-O", "mmp"]
        let image = try DiskImage(options)
        // The premise, by debugfs: the feature is on.
        #expect(try image.debugfs("feature").contains("mmp"))
        #expect {
            try Injector.rehearse(target: image.path, root: .partition(2), users: [Self.user])
        } throws: { (($0 as? AccountsError)?.message.contains("has the mmp feature") == true) }
        try expectUnchanged(image, code: .filesystem, message: "tune2fs -O ^mmp")
    }

    @Test func malformedPasswdIsRefused() throws {
        var options = DiskImage.Options()
        options.files["etc/passwd"] = DiskImage.passwd + "broken:x:12\n"
        try expectUnchanged(try DiskImage(options), code: .malformedFile, message: "/etc/passwd line 4")
    }

    @Test func malformedShadowIsRefused() throws {
        var options = DiskImage.Options()
        options.files["etc/shadow"] = "root:*:19000:0:99999:7:::\ndaemon:*:soon:0:99999:7:::\n"
        try expectUnchanged(try DiskImage(options), code: .malformedFile, message: "/etc/shadow line 2")
    }

    @Test func fullFilesystemIsRefusedBeforeWriting() throws {
        // Few inodes and a root tree that uses them all: not even a home directory fits.
        var options = DiskImage.Options()
        options.mkfsArguments = ["-N", "64"]
        let image = try DiskImage(options)
        let free = try image.debugfs("stats")
        let freeInodes = Int(free.components(separatedBy: "Free inodes:")[1].split(separator: "\n")[0]
            .trimmingCharacters(in: .whitespaces))!
        var users: [UserSpec] = []
        // Enough users that their homes and skel copies need more inodes than are free.
        for i in 0...(freeInodes / 5 + 1) { users.append(UserSpec(name: "u\(i)", password: .locked)) }
        try expectUnchanged(image, users: users, code: .noSpace, message: "free inodes")
    }

    @Test func fullOfBlocksIsRefusedBeforeWriting() throws {
        let image = try DiskImage()
        // Fill the filesystem through debugfs so no block is left, then try to add a user.
        let fill = try TemporaryDirectory()
        let free = try image.debugfs("stats").components(separatedBy: "Free blocks:")[1].split(separator: "\n")[0]
            .trimmingCharacters(in: .whitespaces)
        let blockSize = try image.debugfs("stats").components(separatedBy: "Block size:")[1].split(separator: "\n")[0]
            .trimmingCharacters(in: .whitespaces)
        let filler = fill.file("filler")
        try Shell.must(["truncate", "-s", String(Int(free)! * Int(blockSize)!), filler])
        try Shell.must(["dd", "if=/dev/urandom", "of=\(filler)", "bs=1M", "count=64", "conv=notrunc", "status=none"])
        _ = try Shell.run(["debugfs", "-w", "-R", "write \(filler) /filler", "\(image.path)?offset=\(image.rootOffset)"])
        try expectUnchanged(image, code: .noSpace, message: "too full")
    }

    @Test func missingPartitionIsRefused() throws {
        try expectUnchanged(try DiskImage(), root: .partition(3), code: .partitionNotFound, message: "no partition 3")
    }

    @Test func unknownLabelIsRefused() throws {
        try expectUnchanged(try DiskImage(), root: .label("writable"), code: .partitionNotFound, message: "\"rootfs\"")
    }

    @Test func vfatPartitionIsNotExt4() throws {
        try expectUnchanged(try DiskImage(), root: .partition(1), code: .notExt, message: "partition 1 of")
        let image = try DiskImage()
        #expect {
            _ = try Injector.inject(target: image.path, root: .partition(1), users: [Self.user])
        } throws: { (($0 as? AccountsError)?.message.contains("is vfat, not ext4") == true) }
    }

    @Test func imageWithoutExtRootIsRefused() throws {
        var options = DiskImage.Options()
        options.rootIsVfat = true
        try expectUnchanged(try DiskImage(options), root: .onlyExtPartition, code: .partitionNotFound, message: "no ext2/3/4 partition")
    }

    @Test func missingSupplementaryGroupIsRefused() throws {
        try expectUnchanged(try DiskImage(), users: [UserSpec(name: "lab", groups: ["gpio"], password: .locked)],
                            code: .missingGroup, message: "gpio")
    }

    @Test func badPremadeHashIsRefused() throws {
        try expectUnchanged(try DiskImage(), users: [UserSpec(name: "lab", password: .hash("hunter2"))],
                            code: .invalidHash, message: "not an accepted crypt hash")
    }

    @Test func missingShellIsRefused() throws {
        try expectUnchanged(try DiskImage(), users: [UserSpec(name: "lab", shell: "/bin/zsh", password: .locked)],
                            code: .invalidSpec, message: "/bin/zsh")
    }

    @Test func missingShadowFileIsRefused() throws {
        let image = try DiskImage()
        _ = try Shell.must(["debugfs", "-w", "-R", "rm /etc/shadow", "\(image.path)?offset=\(image.rootOffset)"])
        try expectUnchanged(image, code: .malformedFile, message: "/etc/shadow is missing")
    }

    @Test func notADiskImageIsRefused() throws {
        let dir = try TemporaryDirectory()
        let path = try dir.write("plain.bin", String(repeating: "z", count: 4096))
        #expect { _ = try Injector.inject(target: path, root: .partition(2), users: [Self.user]) }
            throws: { (($0 as? AccountsError)?.code == .partitionTable) }
    }

    @Test func duplicateUsersAreRefused() throws {
        try expectUnchanged(try DiskImage(), users: [Self.user, Self.user], code: .invalidSpec, message: "listed twice")
    }
}

@Suite("Injection refuses what would fail halfway", .serialized)
struct InjectorPreflightTests {
    @Test func homePathThatIsAFileIsRefusedBeforeWriting() throws {
        var options = DiskImage.Options()
        options.files["home/lab"] = "not a directory\n"
        let image = try DiskImage(options)
        let before = try sha256(image.path)
        #expect {
            _ = try Injector.inject(target: image.path, root: .partition(2),
                                    users: [UserSpec(name: "lab", password: .locked, sshKeys: [InjectorTests.key])])
        } throws: { (($0 as? AccountsError)?.message.contains("/home/lab in") == true) }
        #expect(try sha256(image.path) == before)
    }

    @Test("a skel .ssh that is a file, or a symlink the new user's keys would be written through (to /root/.ssh), is refused before writing; so is a symlinked .ssh in an existing home", arguments: ["file", "skel symlink", "home symlink"])
    func sshDirectoryThatIsNoDirectoryIsRefused(kind: String) throws {
        var options = DiskImage.Options()
        if kind == "file" { options.files["etc/skel/.ssh"] = "not a directory\n" }
        if kind == "home symlink" { options.files["home/lab/.profile"] = "# lab's own\n" }
        let image = try DiskImage(options)
        let target = "\(image.path)?offset=\(image.rootOffset)"
        if kind != "file" {
            try Shell.must(["debugfs", "-w", "-R", "mkdir /root/.ssh", target])
            try Shell.must(["debugfs", "-w", "-R", "write /dev/null /root/.ssh/authorized_keys", target])
            try Shell.must(["debugfs", "-w", "-R", "symlink \(kind == "skel symlink" ? "/etc/skel/.ssh" : "/home/lab/.ssh") /root/.ssh", target])
        }
        let before = try sha256(image.path)
        #expect {
            _ = try Injector.inject(target: image.path, root: .partition(2),
                                    users: [UserSpec(name: "lab", password: .locked, sshKeys: [InjectorTests.key])])
        } throws: { error in
            let message = (error as? AccountsError)?.message ?? "\(error)"
            switch kind {
            case "file": return message.contains("/etc/skel/.ssh in") && message.contains("is a file")
            case "skel symlink": return message.contains("/etc/skel/.ssh in") && message.contains("is a symlink (to /root/.ssh)")
            default: return message.contains("/home/lab/.ssh in") && message.contains("is not a directory")
            }
        }
        #expect(try sha256(image.path) == before)
    }

    @Test func symlinkedShadowIsRefusedBeforeWriting() throws {
        let image = try DiskImage()
        let target = "\(image.path)?offset=\(image.rootOffset)"
        try Shell.must(["debugfs", "-w", "-R", "rm /etc/shadow", target])
        try Shell.must(["debugfs", "-w", "-R", "symlink /etc/shadow /etc/shadow.real", target])
        try Shell.must(["debugfs", "-w", "-R", "write /dev/null /etc/shadow.real", target])
        let before = try sha256(image.path)
        #expect {
            _ = try Injector.inject(target: image.path, root: .partition(2), users: [UserSpec(name: "lab", password: .locked)])
        } throws: { (($0 as? AccountsError)?.message.contains("/etc/shadow in") == true) }
        #expect(try sha256(image.path) == before)
    }

    @Test func filesystemLargerThanItsPartitionIsRefused() throws {
        let image = try DiskImage()
        // Shrink partition 2 in the table so the ext4 inside claims more than it holds.
        try Shell.must(["sfdisk", "-q", "-N", "2", image.path], stdin: "start=\(DiskImage.rootStartSector), size=20000\n")
        let before = try sha256(image.path)
        #expect {
            _ = try Injector.inject(target: image.path, root: .partition(2), users: [UserSpec(name: "lab", password: .locked)])
        } throws: { (($0 as? AccountsError)?.message.contains("refusing to write past the partition") == true) }
        #expect(try sha256(image.path) == before)
    }
}
