// systemd/provision-board.service: the web board's unit passes systemd's checks, its
// hardening is measured, and it stays an unprivileged reader of the control socket.

import Foundation
import Testing
import TestSupport

@Suite("systemd unit of the board")
struct BoardUnitTests {
    /// Highest acceptable `systemd-analyze security` exposure (issue 19: ≤ 2.0). Measured 1.3
    /// with systemd 252: an HTTP server needs AF_INET and the host's network.
    static let exposureLimit = 2.0
    static let name = "provision-board.service"

    /// The unit, with ExecStart pointing at a binary that exists (`verify` checks it).
    static func copy(edit: (String) -> String = { $0 }) throws -> (TemporaryDirectory, String) {
        let work = try TemporaryDirectory("provision-board-unit")
        let text = try String(contentsOfFile: Units.directory + "/" + name, encoding: .utf8)
        #expect(text.contains("ExecStart=/usr/local/bin/provision board --listen ${PROVISION_BOARD_LISTEN}"))
        let service = edit(text.replacingOccurrences(of: "ExecStart=/usr/local/bin/provision", with: "ExecStart=/bin/true"))
        try service.write(toFile: work.path + "/" + name, atomically: true, encoding: .utf8)
        return (work, work.path + "/" + name)
    }

    static func lines(_ unit: String) throws -> [String] {
        try String(contentsOfFile: unit, encoding: .utf8).split(separator: "\n").map(String.init)
    }

    @Test func passesSystemdAnalyzeVerify() throws {
        let (work, unit) = try Self.copy()
        defer { work.remove() }
        let output = try Command.run(["systemd-analyze", "verify", unit], timeout: .seconds(60))
        let complaints = (output.stdout + "\n" + output.stderr).split(separator: "\n").filter { $0.contains(work.path) || $0.contains("provision-board") }
        #expect(output.status == 0, "\(output)")
        #expect(complaints.isEmpty, "\(complaints)")
    }

    @Test func verifyCatchesAMistake() throws {
        let (work, unit) = try Self.copy { $0.replacingOccurrences(of: "PrivateTmp=yes", with: "PrivateTmp=yes\nPrivateDevicez=yes") }
        defer { work.remove() }
        let output = try Command.run(["systemd-analyze", "verify", unit], timeout: .seconds(60))
        #expect((output.stdout + output.stderr).contains("PrivateDevicez"))
    }

    func security(_ unit: String) throws -> (Double, [[String: Any]]) {
        let text = try Command.check(["systemd-analyze", "security", "--offline=yes", unit], timeout: .seconds(60)).stdout
        guard let line = text.split(separator: "\n").first(where: { $0.contains("Overall exposure level") }),
              let number = line.split(separator: ":").last?.split(separator: " ").first, let score = Double(number)
        else { throw SimulationError(description: "no exposure level in: \(text)") }
        let json = try Command.check(["systemd-analyze", "security", "--offline=yes", "--json=short", unit], timeout: .seconds(60)).stdout
        return (score, try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]] ?? [])
    }

    @Test func exposureScoreIsAtMostTwo() throws {
        let (work, unit) = try Self.copy()
        defer { work.remove() }
        let (score, _) = try security(unit)
        print("systemd-analyze security --offline=yes \(Self.name): exposure \(score)")
        #expect(score <= Self.exposureLimit)
    }

    @Test func staysAnUnprivilegedReaderWithoutDevices() throws {
        let (work, unit) = try Self.copy()
        defer { work.remove() }
        let (_, entries) = try security(unit)
        func isSet(_ name: String) -> Bool? { entries.first { $0["name"] as? String == name }?["set"] as? Bool }
        #expect(isSet("User=/DynamicUser=") == true)
        // The card readers belong to group provision too: the board gets no /dev of them.
        #expect(isSet("PrivateDevices=") == true)
        #expect(isSet("RestrictAddressFamilies=~AF_NETLINK") == true)
        #expect(isSet("RestrictAddressFamilies=~AF_PACKET") == true)
        #expect(isSet("CapabilityBoundingSet=~CAP_SYS_ADMIN") == true)
        let lines = try Self.lines(unit)
        #expect(lines.contains("SupplementaryGroups=provision"))
        #expect(!lines.contains { $0.contains("provision-admin") && !$0.hasPrefix("#") }, "the board must not be an admin of the station")
        #expect(lines.contains("DynamicUser=yes"))
    }

    @Test func mayBindOnlyTheListeningPort() throws {
        let lines = try Self.lines(Units.directory + "/" + Self.name)
        let listen = try #require(lines.first { $0.hasPrefix("Environment=PROVISION_BOARD_LISTEN=") })
        let port = try #require(listen.split(separator: ":").last.map(String.init))
        #expect(lines.contains("SocketBindDeny=any"))
        #expect(lines.contains("SocketBindAllow=tcp:\(port)"), "SocketBindAllow must match the port of \(listen)")
        #expect(lines.contains("RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"))
    }
}
