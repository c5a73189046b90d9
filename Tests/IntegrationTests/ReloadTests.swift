#if canImport(Glibc)
import Glibc
#endif
import ControlProtocol
import Foundation
import Testing
import TestSupport

extension IntegrationTests {
    /// SIGHUP and `provision reload` with a config that must be refused (issue 13, point 5):
    /// the running configuration stays, the log and every watcher are told why, and cards are
    /// still written by the configuration that stayed.
    @Suite("config reload")
    struct ReloadTests {
        /// Reads watch messages until a reload event arrives; throws after `timeout`.
        func nextReloadEvent(_ watcher: RawConnection, timeout: Duration = .seconds(20)) throws -> Event {
            let deadline = ContinuousClock.now.advanced(by: timeout)
            while ContinuousClock.now < deadline {
                let message = try watcher.readMessage(timeout: deadline - ContinuousClock.now)
                if let event = message.event, event.kind == .reload { return event }
            }
            throw BenchError("no reload event within \(timeout)")
        }

        @Test("a reload judges the cards already present again: a card in a slot the reload adds loses its stale refusal and is written")
        func reloadJudgesPresentCards() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let image = try bench.image("small.img", bytes: 1 << 20)
            try bench.writeConfig([.init(name: "A1", image: image)])
            try bench.startDaemon()
            // A card in a port that is no slot yet: refused as in no configured slot.
            let card = try bench.card(slot: "B1", size: 8 << 20)
            let refused = try bench.waitForStatus("the B1 card refused") { status in
                status.refused.contains { $0.device == card.devicePath }
            }
            #expect(refused.refused.first { $0.device == card.devicePath }?.refusals.contains { $0.contains("in no configured slot") } == true)

            try bench.writeConfig([.init(name: "A1", image: image), .init(name: "B1", image: image)])
            let reply = try bench.cli(["reload"])
            #expect(reply.status == 0, "\(reply)")
            let written = try bench.waitForStatus("B1's card written after the reload") { $0.slot("B1")?.job?.state == .done }
            #expect(written.slot("B1")?.device == card.devicePath)
            #expect(!written.refused.contains { $0.device == card.devicePath }, "the stale refusal is gone")
            #expect(try card.sha256(bytes: 1 << 20) == (try sha256(ofFile: image)))
        }

        @Test("a reload that renames the station or moves its cache applies the rest and says those wait for a restart; status, metrics and the hello keep the running name")
        func settingsFixedAtStartWaitForARestart() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let image = try bench.image("small.img", bytes: 1 << 20)
            try bench.writeConfig([.init(name: "A1", image: image)])
            try bench.startDaemon()
            let running = try bench.status().station

            try bench.writeConfig([.init(name: "A1", image: image), .init(name: "B1", image: image)])
            let text = try String(contentsOfFile: bench.configPath, encoding: .utf8)
                .replacingOccurrences(of: "name = \"\(running)\"", with: "name = \"renamed\"")
                .replacingOccurrences(of: "cache_dir = \"\(bench.directory)/cache\"", with: "cache_dir = \"\(bench.directory)/elsewhere\"")
            try text.write(toFile: bench.configPath, atomically: true, encoding: .utf8)
            let reply = try bench.cli(["reload"])
            #expect(reply.status == 0, "\(reply)")
            #expect(reply.stdout.contains("2 slot(s)") && reply.stdout.contains("not applied until provisiond restarts: name, cache_dir"), "\(reply.stdout)")
            let status = try bench.status()
            #expect(status.slots.map(\.name) == ["A1", "B1"], "the rest is applied")
            #expect(status.station == running, "status keeps the running name: \(status.station)")
            let metrics = try bench.cli(["metrics"])
            #expect(metrics.stdout.contains("station=\"\(running)\"") && !metrics.stdout.contains("renamed"), "\(metrics.stdout.prefix(400))")
            let hello = try bench.cli(["status"])
            #expect(!hello.stdout.contains("renamed"), "\(hello.stdout)")
            #expect(bench.log.contains("name, cache_dir changed in \(bench.configPath); not applied until provisiond restarts"), "\(bench.log)")
            #expect(!FileManager.default.fileExists(atPath: bench.directory + "/elsewhere"))
        }

        @Test("a broken config on SIGHUP or `provision reload` keeps the running one, says why in the log and to watchers, and cards are still written")
        func brokenReloadKeepsTheRunningConfig() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let image = try bench.image("small.img", bytes: 1 << 20)
            try bench.writeConfig([.init(name: "A1", image: image)])
            let good = try String(contentsOfFile: bench.configPath, encoding: .utf8)
            let daemon = try bench.startDaemon()
            let pid = try #require(daemon.pid)

            let watcher = try RawConnection(path: bench.socketPath)
            _ = try watcher.readMessage()  // hello
            watcher.send("{\"id\":1,\"method\":\"watch\"}\n")
            #expect(try watcher.readMessage().result?.status != nil)

            // Each is a file the daemon once accepted, or accepted in part: a NUL that ended the
            // TOML before [[slots]] (every slot dropped), an empty file, a missing image, a
            // home that climbs out of /home.
            let nulBeforeSlots = good.replacingOccurrences(of: "[[slots]]", with: "\u{0}\n[[slots]]")
            let brokenConfigs: [(String, String)] = [
                (nulBeforeSlots, "NUL byte"),
                ("", "empty"),
                (good.replacingOccurrences(of: image, with: image + ".missing"), "not found"),
                (good.replacingOccurrences(of: "verify = true", with: """
                    verify = true
                    [profiles.pA1.root]
                    partition = 2
                    [[profiles.pA1.users]]
                    name = "lab"
                    home = "/home/../../etc"
                    """), "\"..\""),
            ]
            for (index, (text, reason)) in brokenConfigs.enumerated() {
                try text.write(toFile: bench.configPath, atomically: true, encoding: .utf8)
                if index % 2 == 0 {
                    #expect(kill(pid, SIGHUP) == 0)
                } else {
                    let reply = try bench.cli(["reload"])
                    #expect(reply.status != 0, "reload of a broken config must fail: \(reply)")
                    #expect(reply.stderr.contains(reason), "\(reply)")
                }
                let event = try nextReloadEvent(watcher)
                let message = event.message ?? ""
                #expect(message.contains("refused") && message.contains(reason), "\(message)")
                #expect(message.contains(bench.configPath), "the event names the file: \(message)")
                let status = try bench.status()
                #expect(status.slots.map(\.name) == ["A1"], "the running config stays after \(reason): \(status.slots)")
                #expect(status.slots.first?.profile == "pA1")
            }
            #expect(bench.log.contains("reload failed, keeping the running configuration"), "\(bench.log)")
            #expect(bench.log.contains("\(bench.configPath):"), "the log names file and line: \(bench.log)")

            // The configuration that stayed still writes cards.
            let card = try bench.card(slot: "A1", size: 8 << 20)
            try bench.waitForStatus("A1 written by the kept config") { $0.slot("A1")?.job?.state == .done }
            #expect(try card.sha256(bytes: 1 << 20) == (try sha256(ofFile: image)))

            // And a good file is taken again.
            try good.write(toFile: bench.configPath, atomically: true, encoding: .utf8)
            #expect(kill(pid, SIGHUP) == 0)
            let accepted = try nextReloadEvent(watcher)
            #expect(accepted.message?.contains("configuration reloaded") == true, "\(accepted.message ?? "")")
        }
    }
}
