// systemd/: the units pass systemd's own checks, their hardening is measured, and the
// sysusers/tmpfiles snippets create what the units and the udev rules expect.
// PID 1 here is not systemd; `systemd-analyze verify` and `security --offline=yes` load
// unit files without a running manager.

import Foundation
import Testing
import TestSupport

enum Units {
    static let directory = UdevRuleSimulator.packageRoot.appendingPathComponent("systemd").path
    /// Highest acceptable `systemd-analyze security` exposure of the production unit
    /// (0 = locked down, 10 = unprotected): 1.0, as issue 18 asks, measured with the
    /// systemd this machine and CI have (252). Another systemd weighing settings differently
    /// may need this revisited, never the unit loosened.
    static let exposureLimit = 1.0

    /// Copies the units (and, if asked, the loop-device drop-in) into a temporary
    /// directory, with ExecStart pointing at a binary that exists: `verify` checks it.
    static func copy(withLoopDropIn: Bool, edit: (String) -> String = { $0 }) throws -> TemporaryDirectory {
        let work = try TemporaryDirectory("provision-units")
        var service = try String(contentsOfFile: directory + "/provisiond.service", encoding: .utf8)
        #expect(service.contains("ExecStart=/usr/local/bin/provisiond --config /etc/provision/station.toml"))
        service = service.replacingOccurrences(of: "ExecStart=/usr/local/bin/provisiond", with: "ExecStart=/bin/true")
        try edit(service).write(toFile: work.path + "/provisiond.service", atomically: true, encoding: .utf8)
        try FileManager.default.copyItem(atPath: directory + "/provisiond.socket", toPath: work.path + "/provisiond.socket")
        if withLoopDropIn {
            try FileManager.default.copyItem(atPath: directory + "/provisiond.service.d",
                                             toPath: work.path + "/provisiond.service.d")
        }
        return work
    }

    /// `systemd-analyze verify` on both units; returns the lines it printed about them.
    /// verify exits 0 on warnings such as an unknown key, so the lines are the verdict.
    static func verify(_ work: TemporaryDirectory) throws -> (CommandOutput, [String]) {
        let output = try Command.run(
            ["systemd-analyze", "verify", work.path + "/provisiond.service", work.path + "/provisiond.socket"],
            timeout: .seconds(60))
        let lines = (output.stdout + "\n" + output.stderr).split(separator: "\n").map(String.init)
            .filter { $0.contains("provisiond") || $0.contains(work.path) }
        return (output, lines)
    }

    static func security(_ work: TemporaryDirectory) throws -> (Double, [[String: Any]]) {
        let text = try Command.check(
            ["systemd-analyze", "security", "--offline=yes", work.path + "/provisiond.service"]).stdout
        guard let line = text.split(separator: "\n").first(where: { $0.contains("Overall exposure level") }),
              let number = line.split(separator: ":").last?.split(separator: " ").first,
              let score = Double(number)
        else { throw SimulationError(description: "no exposure level in: \(text)") }
        let json = try Command.check(
            ["systemd-analyze", "security", "--offline=yes", "--json=short", work.path + "/provisiond.service"]).stdout
        let entries = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]] ?? []
        return (score, entries)
    }
}

@Suite("systemd units and snippets")
struct SystemdUnitTests {
    @Test func serviceAndSocketPassSystemdAnalyzeVerify() throws {
        let work = try Units.copy(withLoopDropIn: true)
        defer { work.remove() }
        let (output, complaints) = try Units.verify(work)
        #expect(output.status == 0, "\(output)")
        #expect(complaints.isEmpty, "systemd-analyze verify: \(complaints.joined(separator: "\n"))")
    }

    @Test func verifyCatchesAMistakeInTheService() throws {
        // The check above is only as good as its filter: an unknown key must show up.
        let work = try Units.copy(withLoopDropIn: false) {
            $0.replacingOccurrences(of: "PrivateTmp=yes", with: "PrivateTmp=yes\nPrivateDevicez=yes")
        }
        defer { work.remove() }
        let (_, complaints) = try Units.verify(work)
        #expect(complaints.contains { $0.contains("Unknown key") && $0.contains("PrivateDevicez") })
    }

    @Test func verifyCatchesAMissingExecutable() throws {
        let work = try Units.copy(withLoopDropIn: false) {
            $0.replacingOccurrences(of: "ExecStart=/bin/true", with: "ExecStart=/nonexistent/provisiond")
        }
        defer { work.remove() }
        let (output, complaints) = try Units.verify(work)
        #expect(output.status != 0 || !complaints.isEmpty)
        #expect(complaints.contains { $0.contains("/nonexistent/provisiond") })
    }

    @Test func exposureScoreStaysLow() throws {
        let work = try Units.copy(withLoopDropIn: false)
        defer { work.remove() }
        let (score, _) = try Units.security(work)
        print("systemd-analyze security --offline=yes provisiond.service: exposure \(score)")
        #expect(score <= Units.exposureLimit)
    }

    @Test func keepsWhatABlockWritingDaemonNeeds() throws {
        // The hardening must not cut the daemon off: udev's netlink events, the cards in
        // /dev, and udevd's uid 0 as seen by libudev.
        let work = try Units.copy(withLoopDropIn: false)
        defer { work.remove() }
        let (_, entries) = try Units.security(work)
        func isSet(_ name: String) -> Bool? {
            entries.first { $0["name"] as? String == name }?["set"] as? Bool
        }
        #expect(isSet("PrivateNetwork=") == false)
        #expect(isSet("PrivateDevices=") == false)
        #expect(isSet("PrivateUsers=") == false)
        #expect(isSet("RestrictAddressFamilies=~AF_NETLINK") == false)
        #expect(isSet("RestrictAddressFamilies=~AF_UNIX") == false)
        #expect(isSet("RestrictAddressFamilies=~AF_(INET|INET6)") == true)
        #expect(isSet("User=/DynamicUser=") == true)
        let devices = entries.first { $0["name"] as? String == "DeviceAllow=" }?["description"] as? String ?? ""
        for allowed in ["block-sd:rw", "block-mmc:rw", "char-usb_device:rw", "block-blkext:r"] {
            #expect(devices.contains(allowed), "DeviceAllow: \(devices)")
        }
        #expect(!devices.contains("block-loop"), "loop devices belong in the demo drop-in only")
    }

    @Test func onlyTheDemoDropInAllowsLoopDevices() throws {
        let work = try Units.copy(withLoopDropIn: true)
        defer { work.remove() }
        let output = try Command.check(
            ["systemd-analyze", "security", "--offline=yes", "--json=short", work.path + "/provisiond.service"],
            timeout: .seconds(60))
        let entries = try JSONSerialization.jsonObject(with: Data(output.stdout.utf8)) as? [[String: Any]] ?? []
        let devices = entries.first { $0["name"] as? String == "DeviceAllow=" }?["description"] as? String ?? ""
        #expect(devices.contains("block-loop:rw"), "DeviceAllow with drop-in: \(devices)")
    }

    @Test func socketUnitListensWhereTheDaemonLooksByDefault() throws {
        let socket = try String(contentsOfFile: Units.directory + "/provisiond.socket", encoding: .utf8)
        let lines = Set(socket.split(separator: "\n").map(String.init))
        #expect(lines.contains("ListenStream=/run/provision/control.sock"))
        #expect(lines.contains("SocketGroup=provision"))
        #expect(lines.contains("SocketMode=0660"))
    }

    @Test func sysusersCreatesTheGroupsAndTheDaemonUser() throws {
        let root = try TemporaryDirectory("provision-sysusers")
        defer { root.remove() }
        try FileManager.default.createDirectory(atPath: root.path + "/etc", withIntermediateDirectories: true)
        let conf = try String(contentsOfFile: Units.directory + "/sysusers.d/provision.conf", encoding: .utf8)
        try Command.check(["systemd-sysusers", "--root=\(root.path)", "-"], input: conf)
        let groups = try String(contentsOfFile: root.path + "/etc/group", encoding: .utf8)
        let passwd = try String(contentsOfFile: root.path + "/etc/passwd", encoding: .utf8)
        func gid(_ name: String) -> String? {
            for line in groups.split(separator: "\n") {
                let fields: [String] = line.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
                if fields.count > 2 && fields[0] == name { return fields[2] }
            }
            return nil
        }
        let provision = try #require(gid("provision"))
        #expect(gid("provision-admin") != nil)
        let rows: [[String]] = passwd.split(separator: "\n").map { $0.split(separator: ":", omittingEmptySubsequences: false).map(String.init) }
        let user = try #require(rows.first { $0.first == "provisiond" })
        #expect(user[3] == provision, "provisiond's primary group is not provision")
        #expect(user[2] != "0")
        #expect(user[6].hasSuffix("nologin"))
    }

    @Test func tmpfilesCreatesAConfigDirectoryTheDaemonCanReadButNotWrite() throws {
        let root = try TemporaryDirectory("provision-tmpfiles")
        defer { root.remove() }
        try FileManager.default.createDirectory(atPath: root.path + "/etc", withIntermediateDirectories: true)
        let users = try String(contentsOfFile: Units.directory + "/sysusers.d/provision.conf", encoding: .utf8)
        try Command.check(["systemd-sysusers", "--root=\(root.path)", "-"], input: users)
        let conf = try String(contentsOfFile: Units.directory + "/tmpfiles.d/provision.conf", encoding: .utf8)
        try Command.check(["systemd-tmpfiles", "--root=\(root.path)", "--create", "-"], input: conf)
        var info = stat()
        #expect(stat(root.path + "/etc/provision", &info) == 0)
        #expect(info.st_mode & 0o777 == 0o750)
        #expect(info.st_uid == 0)
        let groups = try String(contentsOfFile: root.path + "/etc/group", encoding: .utf8)
        #expect(groups.contains("provision:x:\(info.st_gid):"))
    }
}
