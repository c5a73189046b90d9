import Foundation
import Testing
@testable import Accounts
import TestSupport

/// End to end on real images: libext2fs writes, then debugfs, e2fsck, a read-only loop
/// mount with pwck/grpck and stat judge the result. Needs root for losetup and mount.
@Suite("Injecting users into ext4 images", .serialized)
struct InjectorTests {
    static let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB6mXtJxQn0dJ3bKj9tq8m3zZl0XnZxkQ0lq6m7m1m9e op@bench"
    static let now = Date(timeIntervalSince1970: 20_000 * 86_400 + 3600)

    @Test func injectedUserPassesEveryPeerCheck() throws {
        let image = try DiskImage()
        let report = try Injector.inject(target: image.path, root: .partition(2), users: [
            UserSpec(name: "lab", groups: ["sudo", "users"], gecos: "Lab User", password: .generate(PasswordPolicy()),
                     sshKeys: [Self.key]),
        ], now: Self.now)
        let user = try #require(report.users.first)
        #expect(report.partition == 2 && report.offset == image.rootOffset && report.filesystem == .ext4 && report.label == "rootfs")
        #expect(user.uid == 1000 && user.gid == 1000 && user.created && user.homeCreated)
        let password = try #require(user.generatedPassword)
        #expect(!report.description.contains(password) && !String(reflecting: report).contains(password))

        // debugfs reads the filesystem without our code: the entry is there, hashed, aged today.
        let shadow = try image.debugfs("cat /etc/shadow")
        #expect(shadow.contains("lab:\(user.hash):20000:0:99999:7:::\n"))
        #expect(try HashingTests.hostCrypt(password, user.hash) == user.hash)
        #expect(try image.debugfs("cat /etc/passwd").contains("lab:x:1000:1000:Lab User:/home/lab:/bin/bash\n"))
        #expect(try image.debugfs("cat /etc/group").contains("sudo:x:27:lab\n"))
        // The previous files are kept as shadow-utils does.
        #expect(try image.debugfs("cat /etc/passwd-") == DiskImage.passwd)
        #expect(try image.debugfs("cat /etc/shadow-") == DiskImage.shadow)
        #expect(try image.debugfs("cat /etc/gshadow-") == DiskImage.gshadow)

        let check = try Injector.check(target: image.path, root: .partition(2))
        #expect(check.clean, "\(check.output)")
        let e2fsck = try Shell.run(["e2fsck", "-fn", "\(image.path)?offset=\(image.rootOffset)"])
        #expect(e2fsck.status == 0, "\(e2fsck.stdout)")

        let dir = try TemporaryDirectory()
        let mount = try MountedImage(image: image.path, partition: 2, in: dir)
        defer { mount.close() }
        let m = mount.mountPoint
        let pwck = try Shell.run(["pwck", "-r", "-R", m])
        #expect(pwck.status == 0 && pwck.stdout.isEmpty && pwck.stderr.isEmpty, "pwck: \(pwck.stdout)\(pwck.stderr)")
        let grpck = try Shell.run(["grpck", "-r", "-R", m])
        #expect(grpck.status == 0 && grpck.stdout.isEmpty && grpck.stderr.isEmpty, "grpck: \(grpck.stdout)\(grpck.stderr)")
        func stat(_ path: String) throws -> String {
            try Shell.must(["stat", "-c", "%u:%g %a %F", m + path]).trimmingCharacters(in: .newlines)
        }
        #expect(try stat("/home/lab") == "1000:1000 750 directory")
        #expect(try stat("/home/lab/.ssh") == "1000:1000 700 directory")
        #expect(try stat("/home/lab/.ssh/authorized_keys") == "1000:1000 600 regular file")
        #expect(try stat("/home/lab/.bashrc") == "1000:1000 644 regular file")
        #expect(try stat("/home/lab/.config/app/settings") == "1000:1000 644 regular file")
        #expect(try stat("/home/lab/.config/editor") == "1000:1000 777 symbolic link")
        #expect(try stat("/etc/shadow") == "0:42 640 regular file")
        #expect(try stat("/etc/gshadow") == "0:42 640 regular file")
        #expect(try stat("/etc/passwd") == "0:0 644 regular file")
        #expect(try String(contentsOfFile: m + "/home/lab/.ssh/authorized_keys", encoding: .utf8) == Self.key + "\n")
        #expect(try String(contentsOfFile: m + "/home/lab/.bashrc", encoding: .utf8) == "# ~/.bashrc from skel\nexport EDITOR=vi\n")
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: m + "/home/lab/.config/editor") == "app/settings")
    }

    @Test func gptImageIsFoundByLabelAndInjectedWithYescrypt() throws {
        var options = DiskImage.Options()
        options.label = "gpt"
        options.rootLabel = "nixos"
        let image = try DiskImage(options)
        let hash = try Shell.must(["mkpasswd", "-m", "sha-512", "-S", "fixedsalt", "--stdin"], stdin: "given")
            .trimmingCharacters(in: .newlines)
        let report = try Injector.inject(target: image.path, root: .label("nixos"), users: [
            UserSpec(name: "ops", password: .generate(PasswordPolicy(length: 12))),
            UserSpec(name: "given", uid: 2345, shell: "/bin/sh", password: .hash(hash)),
            UserSpec(name: "robot", password: .locked, sshKeys: [Self.key]),
        ], hashMethod: .yescrypt(cost: nil), now: Self.now)
        #expect(report.partition == 2 && report.users.map(\.uid) == [1000, 2345, 2346])
        let ops = report.users[0]
        #expect(ops.hash.hasPrefix("$y$") && ops.generatedPassword?.count == 12)
        #expect(try HashingTests.hostCrypt(ops.generatedPassword!, ops.hash) == ops.hash)
        #expect(report.users[1].generatedPassword == nil)
        let shadow = try image.debugfs("cat /etc/shadow")
        #expect(shadow.contains("given:\(hash):20000:") && shadow.contains("robot:!:20000:"))
        #expect(try Injector.check(target: image.path, root: .label("nixos")).clean)
        let dir = try TemporaryDirectory()
        let mount = try MountedImage(image: image.path, partition: 2, in: dir)
        defer { mount.close() }
        #expect(try Shell.run(["pwck", "-r", "-R", mount.mountPoint]).status == 0)
        #expect(try Shell.run(["grpck", "-r", "-R", mount.mountPoint]).status == 0)
    }

    @Test func injectingAgainUpdatesTheUserWithoutTouchingTheHome() throws {
        let image = try DiskImage()
        let first = try Injector.inject(target: image.path, root: .partition(2), users: [
            UserSpec(name: "lab", password: .generate(PasswordPolicy()), sshKeys: [Self.key]),
        ], now: Self.now)
        let second = try Injector.inject(target: image.path, root: .partition(2), users: [
            UserSpec(name: "lab", groups: ["sudo"], password: .generate(PasswordPolicy()),
                     sshKeys: [Self.key, "ssh-ed25519 AAAAsecondkey other@bench"]),
        ], now: Self.now.addingTimeInterval(86_400))
        #expect(second.users[0].uid == first.users[0].uid && !second.users[0].created && !second.users[0].homeCreated)
        #expect(second.users[0].hash != first.users[0].hash)
        let shadow = try image.debugfs("cat /etc/shadow")
        #expect(shadow.contains("lab:\(second.users[0].hash):20001:") && !shadow.contains(first.users[0].hash))
        #expect(try image.debugfs("cat /etc/shadow-").contains("lab:\(first.users[0].hash):20000:"))
        #expect(try image.debugfs("cat /etc/passwd").components(separatedBy: "\nlab:").count == 2)
        #expect(try image.debugfs("cat /home/lab/.ssh/authorized_keys") == Self.key + "\nssh-ed25519 AAAAsecondkey other@bench\n")
        #expect(try Injector.check(target: image.path, root: .partition(2)).clean)
    }

    @Test func loginDefsOfTheImageDecideUidsAndHomeMode() throws {
        var options = DiskImage.Options()
        options.files["etc/login.defs"] = "UID_MIN 5000\nUID_MAX 5999\nGID_MIN 6000\nGID_MAX 6999\nHOME_MODE 0700\n"
        options.files["etc/group"] = DiskImage.group + "taken:x:5000:\n"
        options.files["etc/gshadow"] = DiskImage.gshadow + "taken:!::\n"
        let image = try DiskImage(options)
        let report = try Injector.inject(target: image.path, root: .onlyExtPartition,
                                         users: [UserSpec(name: "lab", password: .locked)], now: Self.now)
        #expect(report.users[0].uid == 5000 && report.users[0].gid == 6000)
        #expect(try image.debugfs("stat /home/lab").contains("Mode:  0700"))
        #expect(try Injector.check(target: image.path, root: .partition(2)).clean)
    }
}

/// The same injection on the filesystem flavours cards carry: no extents (ext2, ext3),
/// 4 KiB blocks, and inline data (small files inside the inode).
@Suite("Injection across ext2/3/4 variants", .serialized)
struct FilesystemVariantTests {
    @Test(arguments: [("mkfs.ext2", [String]()), ("mkfs.ext3", []), ("mkfs.ext4", ["-b", "4096"]),
                      ("mkfs.ext4", ["-O", "inline_data"]), ("mkfs.ext4", ["-O", "^has_journal,^metadata_csum"])])
    func injectionIsCleanOnEveryVariant(mkfs: String, arguments: [String]) throws {
        var options = DiskImage.Options()
        options.mkfs = mkfs
        options.mkfsArguments = arguments
        let image = try DiskImage(options)
        let report = try Injector.inject(target: image.path, root: .partition(2), users: [
            UserSpec(name: "lab", groups: ["sudo"], password: .generate(PasswordPolicy()), sshKeys: [InjectorTests.key]),
            UserSpec(name: "second", password: .locked),
        ], now: InjectorTests.now)
        #expect(report.filesystem.rawValue == mkfs.replacingOccurrences(of: "mkfs.", with: ""))
        let check = try Injector.check(target: image.path, root: .partition(2))
        #expect(check.clean, "\(check.output)")
        // The kernel reads the result back (debugfs pads inline-data files with NULs on `cat`).
        let dir = try TemporaryDirectory()
        let mount = try MountedImage(image: image.path, partition: 2, in: dir)
        defer { mount.close() }
        let m = mount.mountPoint
        #expect(try String(contentsOfFile: m + "/home/lab/.ssh/authorized_keys", encoding: .utf8) == InjectorTests.key + "\n")
        #expect(try String(contentsOfFile: m + "/home/second/.config/app/settings", encoding: .utf8) == "answer = 42\n")
        #expect(try String(contentsOfFile: m + "/etc/shadow", encoding: .utf8)
                .contains("lab:\(report.users[0].hash):20000:0:99999:7:::\n"))
        #expect(try String(contentsOfFile: m + "/etc/passwd-", encoding: .utf8) == DiskImage.passwd)
        let pwck = try Shell.run(["pwck", "-r", "-R", m]), grpck = try Shell.run(["grpck", "-r", "-R", m])
        #expect(pwck.status == 0 && pwck.stdout.isEmpty, "\(pwck.stdout)")
        #expect(grpck.status == 0 && grpck.stdout.isEmpty, "\(grpck.stdout)")
    }
}

/// A whole-disk block device is a target like an image file: the card as the daemon sees it.
@Suite("Injection into a block device", .serialized)
struct BlockDeviceTargetTests {
    @Test func injectsThroughALoopDeviceAndRefusesWhileMounted() throws {
        let image = try DiskImage()
        let loop = try Shell.must(["losetup", "--find", "--show", image.path]).trimmingCharacters(in: .whitespacesAndNewlines)
        defer { _ = try? Shell.run(["losetup", "-d", loop]) }
        let report = try Injector.inject(target: loop, root: .label("rootfs"), users: [
            UserSpec(name: "lab", password: .generate(PasswordPolicy())),
        ], now: InjectorTests.now)
        #expect(report.partition == 2 && report.offset == image.rootOffset)
        #expect(try Injector.check(target: loop, root: .partition(2)).clean)
        #expect(try image.debugfs("cat /etc/passwd").contains("lab:x:1000:1000::/home/lab:/bin/bash\n"))

        // While the kernel has the root mounted, the exclusive open fails: never edit
        // a filesystem under a mounted kernel driver.
        let dir = try TemporaryDirectory()
        let mount = try MountedImage(image: image.path, partition: 2, in: dir)
        defer { mount.close() }
        let before = try sha256(image.path)
        #expect(throws: AccountsError.self) {
            _ = try Injector.inject(target: mount.loop, root: .partition(2), users: [UserSpec(name: "x", password: .locked)])
        }
        #expect(try sha256(image.path) == before)
    }

    @Test("a card held exclusively for a moment after it was written (udev re-reading its partition table) is injected once it is free")
    func waitsOutAMomentaryExclusiveHolder() throws {
        let image = try DiskImage()
        let loop = try Shell.must(["losetup", "--find", "--show", image.path]).trimmingCharacters(in: .whitespacesAndNewlines)
        defer { _ = try? Shell.run(["losetup", "-d", loop]) }
        // What the kernel does while it scans the partitions: the disk opened O_EXCL.
        let holder = open(loop, O_RDONLY | O_EXCL | O_CLOEXEC)
        try #require(holder >= 0, "cannot hold \(loop) exclusively: \(String(cString: strerror(errno)))")
        let released = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            usleep(400_000)
            close(holder)
            released.signal()
        }
        defer { released.wait() }
        let report = try Injector.inject(target: loop, root: .label("rootfs"), users: [
            UserSpec(name: "lab", password: .generate(PasswordPolicy())),
        ], now: InjectorTests.now)
        #expect(report.partition == 2)
        #expect(try image.debugfs("cat /etc/passwd").contains("lab:x:1000:1000::/home/lab:/bin/bash\n"))
    }
}
