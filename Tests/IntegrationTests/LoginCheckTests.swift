#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import TestSupport

/// Hashes the image's own login cannot verify, and generated passwords with nowhere to go
/// (issue 15, points 4 and 5): refused by `provision config check`, the daemon and
/// `provision inject`, with the reason named. BootTests proves the premise with a real boot:
/// the test image's busybox login is the one checking.
@Suite("Login capabilities and password export", .serialized)
struct LoginCheckTests {
    static let repository = ProvisioningTests.repository

    func buildImage(_ directory: String, compress: String = "none") throws -> String {
        try Command.check([Self.repository + "/images/build-test-image", "--out", directory, "--size", "128MiB",
                           "--compress", compress, "--quiet"], timeout: .seconds(300))
        return directory + "/rpi-test.img"
    }

    func config(_ directory: String, image: String, users: String, export: String?) -> String {
        """
        [station]
        name = "login-check"
        allow_loop_devices = true
        ledger = "\(directory)/ledger.sqlite"
        \(export.map { "password_export = \"\($0)\"" } ?? "")

        [profiles.p]
        image = "\(image)"
        [profiles.p.root]
        partition = 2
        \(users)

        [[slots]]
        name = "A1"
        match = "loop:*/provision-card-never-\(UInt32.random(in: 0...UInt32.max))-*"
        profile = "p"

        """
    }

    @Test("a yescrypt user is refused before anything is written to the test image, whose busybox login cannot verify it; config check names the methods it can")
    func yescryptRefusedForBusyboxLogin() throws {
        let dir = try TemporaryDirectory()
        defer { dir.remove() }
        let image = try buildImage(dir.path, compress: "zst")
        let before = try sha256(ofFile: image)

        // provision inject: the same rule the daemon runs at injection.
        let refused = try Command.run([DaemonProcess.cliBinary, "inject", image, "--user", "lab", "--generate-password",
                                       "--yescrypt", "--partition", "2", "--shell", "/bin/sh"])
        #expect(refused.status == 64, "\(refused)")
        #expect(refused.stderr.contains("user lab") && refused.stderr.contains("cannot verify yescrypt ($y$)")
                && refused.stderr.contains("busybox (BusyBox v1.35"), "\(refused.stderr)")
        #expect(!refused.stdout.contains("generated password"))
        #expect(try sha256(ofFile: image) == before, "the image changed although the user was refused")
        // SHA-512 is what it can verify: the same user goes in.
        let accepted = try Command.run([DaemonProcess.cliBinary, "inject", image, "--user", "lab", "--generate-password",
                                        "--partition", "2", "--shell", "/bin/sh"])
        #expect(accepted.succeeded, "\(accepted)")

        // config check reads the (zstd-compressed) image's root filesystem and says so by name.
        let yescrypt = try Command.check(["mkpasswd", "-m", "yescrypt", "--stdin"], input: "pw").stdout
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let sha512 = try Command.check(["mkpasswd", "-m", "sha-512", "--stdin"], input: "pw").stdout
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let bad = try dir.write("bad.toml", config(dir.path, image: image + ".zst", users: """
            [[profiles.p.users]]
            name = "ok"
            hash = "\(sha512)"
            [[profiles.p.users]]
            name = "carol"
            hash = "\(yescrypt)"
            """, export: nil))
        let check = try Command.run([DaemonProcess.cliBinary, "config", "check", bad])
        #expect(check.status == 78, "\(check)")
        #expect(check.stdout.contains("profile p: login: /bin/login → busybox (BusyBox v1.35")
                && check.stdout.contains("verifies DES, MD5 ($1$), SHA-256 ($5$), SHA-512 ($6$), not bcrypt ($2b$) or yescrypt ($y$)"),
                "\(check.stdout)")
        #expect(check.stderr.contains("bad.toml:14: profiles.p.users[1]") && check.stderr.contains("user carol")
                && check.stderr.contains("cannot verify yescrypt ($y$)"), "\(check.stderr)")
        #expect(!check.stderr.contains("user ok"), "\(check.stderr)")
        #expect(!check.stdout.contains(": ok —"), "\(check.stdout)")

        let good = try dir.write("good.toml", config(dir.path, image: image + ".zst", users: """
            [[profiles.p.users]]
            name = "ok"
            hash = "\(sha512)"
            """, export: nil))
        let fine = try Command.run([DaemonProcess.cliBinary, "config", "check", good])
        #expect(fine.succeeded, "\(fine)")
        #expect(fine.stdout.contains("profile p: login: /bin/login → busybox"), "\(fine.stdout)")
    }

    @Test("a slot whose users get generated passwords with no export file is refused by config check and by the daemon; with one, config check says where they go")
    func generatedPasswordsNeedAnExportFile() throws {
        let dir = try TemporaryDirectory()
        defer { dir.remove() }
        let users = """
            [[profiles.p.users]]
            name = "bob"
            password = "generate"
            """
        // A real image: config check also proves the profile's files (issue 13).
        let image = try buildImage(dir.path, compress: "none")
        let missing = try dir.write("missing.toml", config(dir.path, image: image, users: users, export: nil))
        let check = try Command.run([DaemonProcess.cliBinary, "config", "check", missing])
        #expect(check.status == 78, "\(check)")
        #expect(check.stderr.contains("missing.toml:11: profiles.p.users[0]: user bob of profile p gets a generated password, but the station has nowhere to put it")
                && check.stderr.contains("password_export"), "\(check.stderr)")

        let daemon = try Command.run([DaemonProcess.daemonBinary, "--config", missing, "--socket", dir.path + "/control.sock"],
                                     timeout: .seconds(60))
        #expect(daemon.status == 78, "\(daemon)")
        #expect((daemon.stdout + daemon.stderr).contains("user bob of profile p gets a generated password"), "\(daemon)")

        let export = dir.path + "/passwords.tsv"
        let present = try dir.write("present.toml", config(dir.path, image: image, users: users, export: export))
        let ok = try Command.run([DaemonProcess.cliBinary, "config", "check", present])
        #expect(ok.succeeded, "\(ok)")
        #expect(ok.stdout.contains("generated passwords: appended to \(export)"), "\(ok.stdout)")
        #expect(ok.stdout.contains("profile p: login: /bin/login → busybox"), "\(ok.stdout)")
    }

    @Test("a profile that generates passwords, in the station file but in no slot, on a station with no export file: the daemon refuses to start")
    func unusedProfileWithoutExportStopsTheStart() throws {
        let bench = try StationBench()
        defer { bench.close() }
        try Command.check([Self.repository + "/images/build-test-image", "--out", bench.directory, "--size", "128MiB", "--compress", "none", "--quiet"],
                          timeout: .seconds(180))
        let image = bench.directory + "/rpi-test.img"
        // No slot uses the profile; every profile of the station file is checked all the same
        // (issue 13), so the daemon refuses to start rather than fail a manual job later.
        try """
            [station]
            name = "export-\(bench.token)"
            allow_loop_devices = true
            ledger = "\(bench.ledgerPath)"
            cache_dir = "\(bench.directory)/cache"

            [profiles.gen]
            image = "\(image)"
            [profiles.gen.root]
            partition = 2
            [[profiles.gen.users]]
            name = "bob"
            password = "generate"

            [profiles.idle]
            image = "\(image)"

            [[slots]]
            name = "NONE"
            match = "loop:*/provision-card-never-\(bench.token)-*"
            profile = "idle"

            """.write(toFile: bench.configPath, atomically: true, encoding: .utf8)
        let daemon = try Command.run([DaemonProcess.daemonBinary, "--config", bench.configPath, "--socket", bench.socketPath],
                                     timeout: .seconds(120))
        #expect(daemon.status == 78, "\(daemon)")
        #expect((daemon.stdout + daemon.stderr).contains("user bob of profile gen gets a generated password, but the station has nowhere to put it"),
                "\(daemon)")
    }
}
