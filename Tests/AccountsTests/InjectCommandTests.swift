import Foundation
import Testing
import TestSupport

/// `provision inject` as an operator runs it: the built executable, real images.
@Suite("provision inject (offline CLI)", .serialized)
struct InjectCommandTests {
    /// The executable `swift build --build-tests` put next to the test bundle (the test
    /// runner is `.build/<triple>/debug/provisionPackageTests.xctest`).
    static var provision: String {
        let runner = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
        let besideRunner = runner.deletingLastPathComponent().appendingPathComponent("provision").path
        if FileManager.default.isExecutableFile(atPath: besideRunner) { return besideRunner }
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        return root.path + "/.build/debug/provision"
    }

    @Test func generatedPasswordIsPrintedOnceAndExported() throws {
        let image = try DiskImage()
        let dir = try TemporaryDirectory()
        let keyFile = try dir.write("key.pub", "# operator key\n\(InjectorTests.key)\n\n")
        let export = dir.file("passwords.tsv")
        let result = try Shell.run([Self.provision, "inject", image.path, "--user", "lab", "--generate-password",
                                    "--groups", "sudo,users", "--ssh-key", keyFile, "--label", "rootfs",
                                    "--yescrypt", "--export", export])
        #expect(result.status == 0, "\(result.stderr)")
        let line = try #require(result.stdout.split(separator: "\n").first { $0.hasPrefix("generated password for lab: ") })
        let password = String(line.dropFirst("generated password for lab: ".count))
        #expect(password.count == 20)
        #expect(result.stdout.components(separatedBy: password).count == 2) // printed exactly once
        #expect(result.stdout.contains("e2fsck -fn: clean"))
        let shadow = try image.debugfs("cat /etc/shadow")
        let hash = try #require(shadow.split(separator: "\n").first { $0.hasPrefix("lab:") }?.split(separator: ":")[1])
        #expect(hash.hasPrefix("$y$") && !shadow.contains(password))
        #expect(try HashingTests.hostCrypt(password, String(hash)) == String(hash))
        #expect(try String(contentsOfFile: export, encoding: .utf8).hasSuffix("\tcard.img\tlab\t\(password)\n"))
        #expect(try image.debugfs("cat /home/lab/.ssh/authorized_keys") == InjectorTests.key + "\n")
    }

    @Test func aBlockDeviceIsJudgedByTheSafetyPolicyAndThatDeviceIsEdited() throws {
        let image = try DiskImage()
        let size = try #require(try FileManager.default.attributesOfItem(atPath: image.path)[.size] as? Int)
        let card = try LoopCard(label: "inject-device", size: Int64(size), image: image.path)
        defer { card.close() }
        let ok = try Shell.run([Self.provision, "inject", card.devicePath, "--user", "lab", "--locked"])
        #expect(ok.status == 0, "\(ok.stderr)")
        #expect(ok.stdout.contains("in partition 2 of \(card.devicePath)") && ok.stdout.contains("e2fsck -fn: clean"), "\(ok.stdout)")
        #expect(!ok.stdout.contains("/proc/") && !ok.stderr.contains("/proc/"), "messages name the device, not the descriptor's path")
        let shadow = try Shell.must(["debugfs", "-R", "cat /etc/shadow", "\(card.devicePath)?offset=\(image.rootOffset)"])
        #expect(shadow.contains("\nlab:!:"), "\(shadow)")

        // One of its partitions mounted (read-only, as a curious operator might): refused
        // before anything is opened for writing, naming the mount, and nothing changes.
        let dir = try TemporaryDirectory()
        let mounted = try MountedImage(image: image.path, partition: 2, in: dir)
        defer { mounted.close() }
        let before = try sha256(image.path)
        let refused = try Shell.run([Self.provision, "inject", mounted.loop, "--user", "other", "--locked"])
        #expect(refused.status == 77, "\(refused)")
        #expect(refused.stderr.contains("refusing to inject into \(mounted.loop)") && refused.stderr.contains("in use: mounted"), "\(refused.stderr)")
        #expect(try sha256(image.path) == before)
    }

    @Test func premadeHashIsWrittenAsGiven() throws {
        let image = try DiskImage()
        let hash = try Shell.must(["mkpasswd", "-m", "sha-512", "-S", "clisaltx", "--stdin"], stdin: "pw")
            .trimmingCharacters(in: .newlines)
        let result = try Shell.run([Self.provision, "inject", image.path, "--user", "op", "--password-hash", hash,
                                    "--partition", "2"])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(!result.stdout.contains("generated password"))
        #expect(try image.debugfs("cat /etc/shadow").contains("op:\(hash):"))
    }

    @Test func errorsExitNonZeroWithTheReasonAndChangeNothing() throws {
        let image = try DiskImage()
        let before = try sha256(image.path)
        let cases: [([String], Int32, String)] = [
            (["--user", "lab", "--generate-password", "--partition", "1"], 65, "partition 1 of \(image.path) is vfat, not ext4"),
            (["--user", "lab", "--generate-password", "--partition", "7"], 66, "has no partition 7"),
            (["--user", "lab", "--password-hash", "plaintext"], 64, "not an accepted crypt hash"),
            (["--user", "lab", "--generate-password", "--groups", "nosuchgroup"], 64, "nosuchgroup"),
            (["--user", "lab"], 64, "exactly one of"),
            (["--user", "lab", "--locked", "--partition", "2", "--label", "rootfs"], 64, "not both"),
        ]
        for (arguments, status, message) in cases {
            let result = try Shell.run([Self.provision, "inject", image.path] + arguments)
            #expect(result.status == status, "\(arguments): \(result.stderr)")
            #expect(result.stderr.contains(message), "\(arguments): \(result.stderr)")
        }
        let missing = try Shell.run([Self.provision, "inject", "/nonexistent/card.img", "--user", "lab", "--locked"])
        #expect(missing.status == 74 && missing.stderr.contains("cannot open /nonexistent/card.img"))
        #expect(try sha256(image.path) == before)
    }
}
