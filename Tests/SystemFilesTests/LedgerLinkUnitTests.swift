// systemd/provision-ledger.{socket,service}: how a station reaches a lab's PostgreSQL ledger
// while provisiond itself stays without IP sockets (issue 18). The proxy passes systemd's
// own checks and is hardened at least as far as the daemon; the daemon's unit is untouched.

import Foundation
import Testing
import TestSupport

@Suite("The shared ledger's Unix-socket link (systemd units)")
struct LedgerLinkUnitTests {
    func copy() throws -> TemporaryDirectory {
        let work = try TemporaryDirectory("provision-ledger-units")
        for name in ["provision-ledger.service", "provision-ledger.socket"] {
            try FileManager.default.copyItem(atPath: Units.directory + "/" + name, toPath: work.path + "/" + name)
        }
        return work
    }

    @Test func proxyUnitsPassSystemdAnalyzeVerify() throws {
        let work = try copy()
        defer { work.remove() }
        let output = try Command.run(["systemd-analyze", "verify", work.path + "/provision-ledger.service", work.path + "/provision-ledger.socket"],
                                     timeout: .seconds(60))
        let complaints = (output.stdout + "\n" + output.stderr).split(separator: "\n").filter { $0.contains("provision-ledger") || $0.contains(work.path) }
        #expect(output.status == 0, "\(output)")
        #expect(complaints.isEmpty, "\(complaints)")
    }

    @Test func proxyIsHardenedAndAllowsNoAddressUntilTold() throws {
        let work = try copy()
        defer { work.remove() }
        let text = try Command.check(["systemd-analyze", "security", "--offline=yes", work.path + "/provision-ledger.service"]).stdout
        let line = try #require(text.split(separator: "\n").first { $0.contains("Overall exposure level") })
        let score = try #require(line.split(separator: ":").last?.split(separator: " ").first.flatMap { Double($0) })
        print("systemd-analyze security --offline=yes provision-ledger.service: exposure \(score)")
        #expect(score <= 1.0)
        let json = try Command.check(["systemd-analyze", "security", "--offline=yes", "--json=short", work.path + "/provision-ledger.service"]).stdout
        let entries = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]] ?? []
        func isSet(_ name: String) -> Bool? { entries.first { $0["name"] as? String == name }?["set"] as? Bool }
        #expect(isSet("IPAddressDeny=") == true)
        #expect(isSet("RestrictAddressFamilies=~AF_UNIX") == true)
        #expect(isSet("RestrictAddressFamilies=~AF_NETLINK") == true)
        #expect(isSet("PrivateDevices=") == true)
    }

    @Test func socketIsWhereTheReadmeURLPoints() throws {
        let socket = try String(contentsOfFile: Units.directory + "/provision-ledger.socket", encoding: .utf8)
        let lines = Set(socket.split(separator: "\n").map(String.init))
        // The example config in README.md: its socket URL (host = the socket's directory,
        // percent-encoded; no port = 5432, as libpq) must name the socket this unit listens on.
        let readme = try String(contentsOfFile: UdevRuleSimulator.packageRoot.appendingPathComponent("README.md").path, encoding: .utf8)
        let example = try #require(readme.split(separator: "\n").first { $0.hasPrefix("ledger = \"postgresql://") && $0.contains("@%2F") },
                                   "README.md has no example `ledger = \"postgresql://…@%2F…\"` line")
        let url = try #require(example.split(separator: "\"").dropFirst().first.map(String.init))
        let authority = try #require(url.dropFirst("postgresql://".count).split(separator: "/").first)
        let hostPort = try #require(authority.split(separator: "@").last)
        let directory = try #require(hostPort.split(separator: ":").first.flatMap { String($0).removingPercentEncoding })
        let port = hostPort.split(separator: ":").dropFirst().first.map(String.init) ?? "5432"
        #expect(lines.contains("ListenStream=\(directory)/.s.PGSQL.\(port)"), "README.md's \(url) points to \(directory)/.s.PGSQL.\(port)")
        #expect(lines.contains("SocketGroup=provision") && lines.contains("SocketMode=0660"))
        // The unit's own comment shows the same URL.
        #expect(socket.contains("ledger = \"\(url)\""), "provision-ledger.socket's comment does not show README.md's \(url)")
        // The daemon's own unit still keeps it off IP.
        let daemon = try String(contentsOfFile: Units.directory + "/provisiond.service", encoding: .utf8)
        #expect(daemon.contains("\nRestrictAddressFamilies=AF_UNIX AF_NETLINK\n") && daemon.contains("\nIPAddressDeny=any\n"))
    }
}
