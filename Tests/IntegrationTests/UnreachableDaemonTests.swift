#if canImport(Glibc)
import Glibc
#endif
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
