#if canImport(Glibc)
import Glibc
#endif
import ControlProtocol
import Foundation
import Testing
import TestSupport

extension IntegrationTests {
    /// `provision board` as a process, without a browser: where it listens, what it says
    /// when the daemon cannot be reached, that nothing through it changes the station, and
    /// that no password or hash leaves it.
    @Suite("board service")
    struct BoardServiceTests {
        static func problem(_ state: [String: Any]) -> String { state["problem"] as? String ?? "" }
        static func connected(_ state: [String: Any]) -> Bool { state["connected"] as? Bool == true }

        @Test("a missing socket: the page says so, the log says so, and the board connects once the daemon starts")
        func missingSocketThenDaemon() throws {
            let bench = try StationBench()
            defer { bench.close() }
            try bench.writeConfig([.init(name: "A1", image: try bench.image("small.img", bytes: 1 << 20))])
            let board = try BoardUnderTest(bench: bench)
            defer { board.stop() }
            let state = try board.waitForState("the missing socket") { !Self.connected($0) && Self.problem($0).contains("No such file") }
            #expect(Self.problem(state).contains("cannot reach provisiond at \(bench.socketPath)"), "\(state)")
            #expect(Self.problem(state).contains("provision board --socket PATH"), "advice for the board, not the CLI: \(state)")
            try board.process.waitForLine(containing: "cannot reach provisiond at \(bench.socketPath)")
            #expect(try board.request("GET", "/").status == 200, "the page is served meanwhile")
            try bench.startDaemon()
            // Connected, and the first status in (the page hears of the two one after the other).
            let live = try board.waitForState("the daemon") { Self.connected($0) && ($0["tiles"] as? [Any])?.isEmpty == false }
            #expect(live["station"] as? String == "integration-\(bench.token)")
            #expect((live["tiles"] as? [[String: Any]])?.map { $0["name"] as? String } == ["A1"])
        }

        @Test("on a quiet station the daemon closes the board's idle query connection; the board opens it again at the next question and stays connected")
        func idleQueryConnectionIsOpenedAgain() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let image = try bench.image("small.img", bytes: 1 << 20)
            try bench.writeConfig([.init(name: "A1", image: image)], stationLines: ["idle_client_timeout = 1"])
            let daemon = try bench.startDaemon()
            let pid = try #require(daemon.pid)
            let board = try BoardUnderTest(bench: bench)
            defer { board.stop() }
            try board.waitForState("the daemon") { Self.connected($0) && ($0["tiles"] as? [Any])?.count == 1 }
            // The watch stays; the query connection, asked nothing, is closed by the daemon.
            let connected = daemonDescriptors(pid)
            try waitFor("the daemon to close the board's idle query connection", timeout: .seconds(60)) { daemonDescriptors(pid) < connected }
            // A reload is an event only a fresh status explains: asked on a new connection.
            try bench.writeConfig([.init(name: "A1", image: image), .init(name: "B1", image: image)], stationLines: ["idle_client_timeout = 1"])
            #expect(try bench.cli(["reload"]).status == 0)
            let state = try board.waitForState("the new slot") { ($0["tiles"] as? [[String: Any]])?.count == 2 }
            #expect(Self.connected(state), "\(state)")
            #expect(!board.log.contains("retrying until it answers"), "the board lost the daemon: \(board.log)")
        }

        @Test("provisiond stops at once on SIGTERM while the board watches it, and the board waits for the next one")
        func daemonStopsWhileWatched() throws {
            let bench = try StationBench()
            defer { bench.close() }
            try bench.writeConfig([.init(name: "A1", image: try bench.image("small.img", bytes: 1 << 20))])
            let daemon = try bench.startDaemon()
            let board = try BoardUnderTest(bench: bench)
            defer { board.stop() }
            try board.waitForState("the daemon") { Self.connected($0) }
            // A watch session never ends by itself; the daemon's shutdown must end it.
            // Exit status 0 within the ceiling: it stopped by itself (systemd would wait 90 s
            // and SIGKILL). How quickly is not timed here: a loaded CI machine would decide it.
            #expect(daemon.stop(timeout: .seconds(30)) == 0, "provisiond did not exit on SIGTERM; log:\n\(bench.log)")
            try board.waitForState("the daemon gone") { !Self.connected($0) }
            var daemonAgain = try bench.startDaemon()
            try board.waitForState("the daemon back") { Self.connected($0) }
            #expect(board.process.isRunning)
            // Every connection of an ended session is closed: after more restarts the board
            // holds exactly its two connections to the daemon (watch and queries), by the
            // kernel's list of Unix sockets.
            let pid = try #require(board.process.pid)
            func daemonConnections() throws -> [Substring] {
                try Command.check(["ss", "-Hxp"]).stdout.split(separator: "\n").filter { $0.contains("pid=\(pid),") }
            }
            let first = try daemonConnections()
            #expect(first.count == 2, "\(first)")
            for _ in 0..<3 {
                daemonAgain.stop()
                try board.waitForState("the daemon gone") { !Self.connected($0) }
                daemonAgain = try bench.startDaemon()
                try board.waitForState("the daemon back") { Self.connected($0) }
            }
            let last = try daemonConnections()
            #expect(last.count == 2, "\(last)")
        }

        @Test("a socket nobody listens on: 'Connection refused' on the page")
        func refusedSocket() throws {
            let bench = try StationBench()
            defer { bench.close() }
            // A socket file left behind, as by a daemon killed with SIGKILL.
            close(try boundUnixSocket(bench.socketPath, type: Int32(SOCK_STREAM.rawValue)))
            let board = try BoardUnderTest(bench: bench)
            defer { board.stop() }
            let state = try board.waitForState("the refused socket") { Self.problem($0).contains("Connection refused") }
            #expect(!Self.connected(state))
        }

        @Test("a board user outside group provision is told which group it needs")
        func permissionDenied() throws {
            let bench = try StationBench()
            defer { bench.close() }
            try bench.writeConfig([.init(name: "A1", image: try bench.image("small.img", bytes: 1 << 20))])
            try bench.startDaemon()
            let board = try BoardUnderTest(bench: bench, prefix: ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            defer { board.stop() }
            let state = try board.waitForState("the permission problem") { !Self.problem($0).isEmpty }
            #expect(Self.problem(state).contains("no permission to open \(bench.socketPath)"), "\(state)")
            #expect(Self.problem(state).contains("group (provision)"), "\(state)")
        }

        @Test("the board listens on the address it was given and nowhere else")
        func listensOnlyWhereTold() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let board = try BoardUnderTest(bench: bench, listen: "127.0.0.1:0")
            defer { board.stop() }
            #expect(try board.request("GET", "/").status == 200)
            // Another loopback address of the same machine: nothing listens there.
            let elsewhere = try Command.run(["curl", "-s", "--max-time", "5", "http://127.0.0.2:\(board.port)/"])
            #expect(elsewhere.status == 7, "curl exit 7 is 'could not connect': \(elsewhere)")
            // The kernel's list of listening sockets: exactly one for the board's process.
            let pid = try #require(board.process.pid)
            let listening = try Command.check(["ss", "-Hltnp"]).stdout.split(separator: "\n").filter { $0.contains("pid=\(pid),") }
            #expect(listening.count == 1, "\(listening)")
            #expect(listening.first?.contains("127.0.0.1:\(board.port) ") == true, "\(listening)")
        }

        @Test("--listen refuses a host name and a missing port, naming the problem")
        func badListenArguments() throws {
            for (argument, reason) in [("localhost:8080", "not a numeric IP address"), ("127.0.0.1", "no port"), ("1.2.3.4:99999", "not a port number")] {
                let output = try Command.run([DaemonProcess.cliBinary, "board", "--listen", argument], timeout: .seconds(20))
                #expect(output.status == 64, "\(argument): \(output)")
                #expect(output.stderr.contains(reason), "\(argument): \(output)")
            }
            // An address this machine does not have: a clear error, not a crash.
            let output = try Command.run([DaemonProcess.cliBinary, "board", "--listen", "192.0.2.1:8080", "--socket", "/nonexistent.sock"], timeout: .seconds(20))
            #expect(output.status == 71, "\(output)")
            #expect(output.stderr.contains("cannot serve on 192.0.2.1:8080"), "\(output)")
        }

        @Test("no request to the board changes the station, even when the board runs as root")
        func noChangingCallThroughTheBoard() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let image = try bench.image("small.img", bytes: 1 << 20)
            try bench.writeConfig([.init(name: "A1", image: image)])
            try bench.startDaemon()
            // As root the daemon would let this connection flash, cancel and reload: only the
            // board's construction stands in the way.
            let board = try BoardUnderTest(bench: bench)
            defer { board.stop() }
            try board.waitForState("the daemon") { Self.connected($0) }
            #expect(board.log.contains("admin rights"), "the board warns that it runs with more rights than it needs")
            let request = #"{"id":1,"method":"reload"}"#
            let flash = #"{"id":2,"method":"flash","params":{"device":"/dev/loop0","image":"\#(image)"}}"#
            for method in ["POST", "PUT", "PATCH", "DELETE"] {
                for path in ["/", "/events", "/state.json", "/reload", "/flash", "/cancel", "/api/reload", "/control"] {
                    for body in [request, flash] {
                        let (status, _) = try board.request(method, path, body: body)
                        #expect(status == 404 || status == 405, "\(method) \(path) answered \(status)")
                    }
                }
            }
            for path in ["/reload", "/flash?device=/dev/loop0", "/cancel?job=1", "/?method=reload", "/state.json?method=reload"] {
                let (status, _) = try board.request("GET", path)
                #expect(status == 404 || status == 200, "GET \(path) answered \(status)")
            }
            #expect(try bench.jobs().isEmpty, "a job was started through the board")
            #expect(!bench.log.contains("configuration reloaded"), "the daemon was reloaded through the board")
            // The detector works: a real reload is seen.
            try #require(bench.cli(["reload"]).succeeded)
            let deadline = ContinuousClock.now.advanced(by: .seconds(60))
            while !bench.log.contains("configuration reloaded") && ContinuousClock.now < deadline { usleep(50_000) }
            #expect(bench.log.contains("configuration reloaded"))
        }

        @Test("a generated password and the hashes never reach the page, even from an admin connection")
        func noPasswordOrHashLeaves() throws {
            let bench = try StationBench()
            defer { bench.close() }
            try Command.check([ProvisioningTests.repository + "/images/build-test-image", "--out", bench.directory, "--size", "128MiB",
                               "--compress", "none", "--quiet"], timeout: .seconds(120))
            try ProvisioningTests().writeConfig(bench, slot: "U1", profile: """
                image = "\(bench.directory)/rpi-test.img"
                [profiles.p.root]
                partition = 2
                [[profiles.p.users]]
                name = "tech"
                password = "generate"
                """)
            try bench.startDaemon()
            // Root: the daemon sends this connection the generated password in the job's
            // "done" event, so filtering it is the board's own doing.
            let board = try BoardUnderTest(bench: bench)
            defer { board.stop() }
            try board.waitForState("the daemon") { Self.connected($0) }
            // Everything the page would be sent while the card is written and provisioned.
            let stream = try ChildProcess(["curl", "-sN", "--max-time", "180", board.url + "/events"], logPath: bench.directory + "/events.txt")
            defer { stream.stop() }
            try stream.waitForLine(containing: "data: ")
            // What the daemon sent the same kind of connection (root), for comparison: the
            // password is really there to be filtered.
            let watch = try ChildProcess([DaemonProcess.cliBinary, "watch", "--json", "--socket", bench.socketPath],
                                         logPath: bench.directory + "/watch.json")
            defer { watch.stop() }
            // Connected before the card goes in (a loaded machine can take seconds to start a
            // process): a reload is announced to every watcher.
            var watching = false
            let deadline = ContinuousClock.now.advanced(by: .seconds(30))
            while !watching && ContinuousClock.now < deadline {
                try #require(bench.cli(["reload"]).succeeded)
                watching = (try? watch.waitForLine(containing: "\"kind\":\"reload\"", timeout: .seconds(1))) != nil
            }
            try #require(watching, "provision watch never saw a reload: \(watch.log)")
            try bench.card(slot: "U1", size: 160 << 20)
            let done = try board.waitForState("U1 done", timeout: .seconds(150)) { state in
                (state["tiles"] as? [[String: Any]])?.first?["word"] as? String == "done — remove card"
            }
            try stream.waitForLine(containing: "done — remove card")
            stream.stop()
            let export = try String(contentsOfFile: bench.directory + "/passwords.tsv", encoding: .utf8)
            let password = try #require(export.split(separator: "\n").last?.split(separator: "\t").last.map(String.init))
            #expect(password.count >= 8)
            try watch.waitForLine(containing: "\"state\":\"done\"")
            #expect(watch.log.contains(password), "the daemon did not send the password to root: the test would prove nothing")
            let hash = try Command.check(["sqlite3", bench.ledgerPath, "SELECT hash FROM jobUser"]).stdout
                .trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(hash.hasPrefix("$6$"))
            let sent = stream.log + (try board.request("GET", "/state.json").body)
            #expect(sent.contains("lab-U1-"), "the unit name is shown: \(done)")
            #expect(!sent.contains(password), "the generated password reached the page")
            #expect(!sent.contains(hash) && !sent.contains("$6$"), "a hash reached the page")
        }
    }
}
