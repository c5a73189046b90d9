import ControlProtocol
import Foundation
import Testing
import TestSupport

extension IntegrationTests {
    /// Garbage on the control socket gets an error reply, never a crash or a hang, and the
    /// daemon goes on answering.
    @Suite("control protocol robustness")
    struct ProtocolRobustnessTests {
        func startedBench() throws -> StationBench {
            let bench = try StationBench()
            do {
                try bench.writeConfig([.init(name: "A1", image: try bench.image("small.img", bytes: 1 << 20))])
                try bench.startDaemon()
            } catch {
                bench.close()
                throw error
            }
            return bench
        }

        /// A fresh connection: the hello, then `status` must answer.
        func expectAnswersStatus(_ bench: StationBench, sourceLocation: SourceLocation = #_sourceLocation) throws {
            let c = try RawConnection(path: bench.socketPath)
            let hello = try c.readMessage()
            #expect(hello.hello?.daemon == "provisiond", sourceLocation: sourceLocation)
            #expect(hello.hello?.access == "admin", "root is admin", sourceLocation: sourceLocation)
            c.send("{\"id\":1,\"method\":\"status\"}\n")
            let reply = try c.readMessage()
            #expect(reply.id == 1, sourceLocation: sourceLocation)
            #expect(reply.ok == true, sourceLocation: sourceLocation)
            #expect(reply.result?.status?.slot("A1") != nil, sourceLocation: sourceLocation)
            #expect(try bench.cli(["status"]).status == 0, sourceLocation: sourceLocation)
        }

        @Test("a client that shuts down its writing side after its requests (nc -N, socat) gets every answer, then the end; a watch it half-closes ends at once")
        func halfClosedClientIsAnswered() throws {
            let bench = try startedBench()
            defer { bench.close() }
            let c = try RawConnection(path: bench.socketPath)
            #expect(try c.readMessage().hello != nil)
            c.send("{\"id\":1,\"method\":\"status\"}\n{\"id\":2,\"method\":\"metrics\"}\n{\"id\":3,\"method\":\"jobs\"}\n")
            #expect(shutdown(c.fd, Int32(SHUT_WR)) == 0)
            var ids: [Int] = []
            while let line = try c.readLine() {
                let message = try LineCodec.decode(ServerMessage.self, from: Data(line.utf8))
                #expect(message.ok == true, "\(line.prefix(200))")
                if let id = message.id { ids.append(id) }
            }
            #expect(ids == [1, 2, 3], "every request before the end of input is answered, then the connection ends")

            let watcher = try RawConnection(path: bench.socketPath)
            #expect(try watcher.readMessage().hello != nil)
            watcher.send("{\"id\":1,\"method\":\"watch\"}\n")
            #expect(shutdown(watcher.fd, Int32(SHUT_WR)) == 0)
            #expect(try watcher.readMessage().result?.status != nil)
            // No event comes (no card): the end is the daemon closing, not a timeout.
            #expect(try watcher.readLine(timeout: .seconds(30)) == nil, "a half-closed watch ends")
            try expectAnswersStatus(bench)
        }

        @Test("malformed JSON gets a bad-request reply and the connection goes on")
        func malformedJSONIsAnsweredWithError() throws {
            let bench = try startedBench()
            defer { bench.close() }
            let c = try RawConnection(path: bench.socketPath)
            _ = try c.readMessage()
            for garbage in ["this is not json", "{\"id\":1,\"method\":", "[1,2,3]", "{\"id\":2}", "{\"method\":\"status\"}", "\u{FF}\u{FE}"] {
                c.send(garbage + "\n")
                let reply = try c.readMessage()
                #expect(reply.ok == false, "\(garbage)")
                #expect(reply.error?.code == .badRequest, "\(garbage): \(String(describing: reply.error))")
                #expect(reply.error?.message.contains("malformed request") == true, "\(garbage): \(String(describing: reply.error))")
            }
            // Same connection, still served.
            c.send("{\"id\":3,\"method\":\"status\"}\n")
            let reply = try c.readMessage()
            #expect(reply.id == 3)
            #expect(reply.result?.status != nil)
            try expectAnswersStatus(bench)
        }

        @Test("an unknown method gets an unknown-method reply with its id and the known methods")
        func unknownMethodIsAnsweredWithError() throws {
            let bench = try startedBench()
            defer { bench.close() }
            let c = try RawConnection(path: bench.socketPath)
            _ = try c.readMessage()
            c.send("{\"id\":41,\"method\":\"format-all-disks\"}\n")
            let reply = try c.readMessage()
            #expect(reply.id == 41)
            #expect(reply.ok == false)
            #expect(reply.error?.code == .unknownMethod)
            #expect(reply.error?.message.contains("format-all-disks") == true)
            #expect(reply.error?.message.contains("status") == true, "the reply lists the known methods")
            c.send("{\"id\":42,\"method\":\"jobs\",\"params\":{\"state\":\"exploded\"}}\n")
            let badState = try c.readMessage()
            #expect(badState.id == 42)
            #expect(badState.error?.code == .badRequest)
            c.send("{\"id\":43,\"method\":\"status\"}\n")
            #expect(try c.readMessage().result?.status != nil)
            try expectAnswersStatus(bench)
        }

        @Test("a line over the limit (64 KiB) gets an error reply and its connection is closed; the daemon goes on")
        func overlongLineIsRefused() throws {
            let bench = try startedBench()
            defer { bench.close() }
            let c = try RawConnection(path: bench.socketPath)
            _ = try c.readMessage()
            // One JSON-looking line of 1 MiB + 64 KiB that never ends in time.
            let line = Array("{\"id\":5,\"method\":\"status\",\"pad\":\"".utf8) + [UInt8](repeating: UInt8(ascii: "x"), count: (1 << 20) + (64 << 10)) + Array("\"}\n".utf8)
            c.send(line)
            let reply = try c.readMessage()
            #expect(reply.ok == false)
            #expect(reply.error?.code == .badRequest)
            #expect(reply.error?.message.contains("longer than \(ControlProtocol.maxLineLength) bytes") == true, "\(String(describing: reply.error))")
            #expect(try c.readLine() == nil, "the connection is closed after an overlong line")
            try expectAnswersStatus(bench)
        }

        @Test("a client streaming 64 MiB without a newline cannot take the daemon's memory")
        func endlessLineDoesNotGrowMemory() throws {
            let bench = try startedBench()
            defer { bench.close() }
            let pid = try #require(bench.daemonPID)
            let before = try peakResidentKiB(pid)
            let c = try RawConnection(path: bench.socketPath)
            _ = try c.readMessage()
            let chunk = [UInt8](repeating: UInt8(ascii: "y"), count: 1 << 20)
            var sent = 0
            for _ in 0..<64 {
                let n = c.send(chunk)
                sent += n
                if n < chunk.count { break }
            }
            let reply = try c.readMessage()
            #expect(reply.error?.code == .badRequest)
            let grown = try peakResidentKiB(pid) - before
            #expect(grown < 16 << 10, "VmHWM grew by \(grown) KiB after \(sent) bytes without a newline")
            try expectAnswersStatus(bench)
        }

        /// VmHWM of a process, in KiB.
        func peakResidentKiB(_ pid: pid_t) throws -> Int {
            let text = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
            guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
                  let kib = Int(line.split(separator: " ").dropFirst().first ?? "") else {
                throw BenchError("no VmHWM in /proc/\(pid)/status")
            }
            return kib
        }

        @Test("a client that disconnects in the middle of a line does not disturb the daemon")
        func halfLineThenHangUp() throws {
            let bench = try startedBench()
            defer { bench.close() }
            for _ in 0..<20 {
                let c = try RawConnection(path: bench.socketPath)
                c.send("{\"id\":1,\"meth")
            }
            let watcher = try RawConnection(path: bench.socketPath)
            _ = try watcher.readMessage()
            watcher.send("{\"id\":9,\"method\":\"watch\"}\n")
            #expect(try watcher.readMessage().result?.status != nil)
            try expectAnswersStatus(bench)
        }
    }
}
