#if canImport(Glibc)
import Glibc
#endif
import ControlProtocol
import Foundation
import Testing
import TestSupport

extension IntegrationTests {
    @Suite("no daemon")
    struct UnreachableDaemonTests {
        @Test("provision status exits 69 and says how to find the daemon when no socket exists")
        func missingSocketIsUnreachable() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let output = try bench.cli(["status"])
            #expect(output.status == 69, "\(output)")
            #expect(output.stderr.contains("cannot reach provisiond at \(bench.socketPath)"), "\(output)")
            #expect(output.stderr.contains("is it running?"), "\(output)")
            #expect(output.stdout.isEmpty)
        }

        @Test("provision status exits 69 when the socket file exists but nothing listens")
        func staleSocketIsUnreachable() throws {
            let bench = try StationBench()
            defer { bench.close() }
            // A socket file left behind, as by a daemon killed with SIGKILL.
            close(try boundUnixSocket(bench.socketPath, type: Int32(SOCK_STREAM.rawValue)))
            let output = try bench.cli(["status"])
            #expect(output.status == 69, "\(output)")
            #expect(output.stderr.contains("cannot reach provisiond"), "\(output)")
            #expect(output.stderr.contains("Connection refused"), "\(output)")
        }

        @Test("a socket that never greets (not provisiond's, or a daemon stopped) is exit 69 after --timeout, not a command that hangs")
        func silentSocketTimesOut() throws {
            let bench = try StationBench()
            defer { bench.close() }
            // Listening, so the connection is made (the kernel's backlog), and nobody answers.
            let fd = try boundUnixSocket(bench.socketPath, type: Int32(SOCK_STREAM.rawValue))
            defer { close(fd) }
            #expect(listen(fd, 8) == 0)
            for command in [["status"], ["jobs", "--json"], ["watch"]] {
                let output = try bench.cli(command + ["--timeout", "0.5"])
                #expect(output.status == 69, "\(command): \(output)")
                #expect(output.stderr.contains("did not send its greeting within 0.5 seconds"), "\(command): \(output)")
            }
            let bad = try bench.cli(["status", "--timeout", "0"])
            #expect(bad.status == 64, "\(bad)")
        }

        @Test("a reply without the result its request asks for is exit 69 naming it, not a crash")
        func replyWithoutItsResult() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let fd = try boundUnixSocket(bench.socketPath, type: Int32(SOCK_STREAM.rawValue))
            defer { close(fd) }
            #expect(listen(fd, 8) == 0)
            let greeting = try LineCodec.encode(ServerMessage(hello: Hello(daemon: "not-quite", station: "s", access: "admin")))
            let commands = [["status"], ["status", "--lab"], ["jobs"], ["devices"], ["cards"], ["metrics"], ["flash", "/dev/null", "--image", "/dev/null"]]
            // Answers each client's first request with a result that holds nothing.
            let server = Thread {
                for _ in commands {
                    let client = accept(fd, nil, nil)
                    guard client >= 0 else { return }
                    _ = greeting.withUnsafeBytes { write(client, $0.baseAddress!, $0.count) }
                    var byte: UInt8 = 0
                    while read(client, &byte, 1) == 1, byte != 0x0A {}
                    let reply = Array(#"{"id":1,"ok":true,"result":{}}"#.utf8) + [0x0A]
                    _ = reply.withUnsafeBytes { write(client, $0.baseAddress!, $0.count) }
                    close(client)
                }
            }
            server.start()
            for command in commands {
                let output = try bench.cli(command + ["--timeout", "10"])
                #expect(output.status == 69, "\(command): \(output)")
                #expect(output.stderr.contains("holds no result"), "\(command): \(output)")
            }
        }

        @Test("options that cannot apply are usage errors (64) before the daemon is asked")
        func usageErrorsBeforeAsking() throws {
            let bench = try StationBench()
            defer { bench.close() }
            for (command, why) in [(["jobs", "--limit", "0"], "--limit takes 1 to 10000"), (["metrics", "--json"], "--json does not apply"),
                                   (["status", "--timeout", "0"], "--timeout takes seconds")] {
                let output = try bench.cli(command)
                #expect(output.status == 64, "\(command): \(output)")
                #expect(output.stderr.contains(why), "\(command): \(output)")
            }
        }

        @Test("every client command exits 69 without a daemon, also with --json")
        func everyCommandIsUnreachable() throws {
            let bench = try StationBench()
            defer { bench.close() }
            for command in [["status", "--json"], ["jobs"], ["devices"], ["watch"], ["cancel", "1"], ["reload"]] {
                let output = try bench.cli(command)
                #expect(output.status == 69, "\(command): \(output)")
                #expect(output.stderr.contains("cannot reach provisiond"), "\(command): \(output)")
            }
        }
    }
}
