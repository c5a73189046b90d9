import ControlProtocol
import Foundation
import Testing
import TestSupport

extension IntegrationTests {
    /// Who may do what is decided from SO_PEERCRED: the socket's group reads, the admin
    /// group (and root) may change things, everyone else cannot even connect.
    @Suite("authorization")
    struct AuthorizationTests {
        /// `setpriv` running the CLI as nobody:nogroup with exactly `groups`.
        func asNobody(groups: [gid_t]) -> [String] {
            ["setpriv", "--reuid=nobody", "--regid=nogroup"]
                + (groups.isEmpty ? ["--clear-groups"] : ["--groups=" + groups.map(String.init).joined(separator: ",")])
        }

        func startedBench() throws -> StationBench {
            let bench = try StationBench()
            do {
                try bench.writeConfig([.init(name: "A1", image: try bench.image("small.img", bytes: 1 << 20))])
                try bench.startDaemon()
                // The CLI binary and its Swift runtime must be reachable by nobody for this
                // test to mean anything.
                let probe = try Command.run(asNobody(groups: []) + [DaemonProcess.cliBinary, "--help"])
                guard probe.succeeded else { throw BenchError("nobody cannot run \(DaemonProcess.cliBinary): \(probe)") }
            } catch {
                bench.close()
                throw error
            }
            return bench
        }

        @Test("the control socket is root:provision 0660")
        func socketOwnershipAndMode() throws {
            let bench = try startedBench()
            defer { bench.close() }
            var st = stat()
            #expect(stat(bench.socketPath, &st) == 0)
            #expect(st.st_mode & 0o777 == 0o660)
            #expect(st.st_uid == 0)
            #expect(st.st_gid == (try getGID("provision")))
        }

        @Test("a member of the socket's group may read the status")
        func readerMayReadStatus() throws {
            let bench = try startedBench()
            defer { bench.close() }
            let output = try bench.cli(["status"], prefix: asNobody(groups: [try getGID("provision")]))
            #expect(output.status == 0, "\(output)")
            #expect(output.stdout.contains("A1"))
            let jobs = try bench.cli(["jobs"], prefix: asNobody(groups: [try getGID("provision")]))
            #expect(jobs.status == 0, "\(jobs)")
        }

        @Test("under socket activation the socket's group is read from the socket systemd passes, not from --socket: a member of that group may read the status")
        func socketActivationGroup() throws {
            let bench = try StationBench()
            defer { bench.close() }
            try bench.writeConfig([.init(name: "A1", image: try bench.image("small.img", bytes: 1 << 20))])
            // systemd-socket-activate listens on the bench's socket and starts the daemon at the
            // first connection with it as fd 3; the socket is given to group provision first, as
            // provisiond.socket's SocketGroup= does. --socket names another path, as after a
            // drop-in that moved ListenStream= without changing it.
            let socket = bench.socketPath
            let launcher = ["/usr/bin/systemd-socket-activate", "-l", socket, "/bin/sh", "-c",
                            "chgrp provision \"$0\" && chmod 660 \"$0\" && exec \"$@\"", socket]
            try bench.startDaemon(launcher: launcher, extraArguments: ["--socket", bench.directory + "/not-this.sock"])
            let output = try bench.cli(["status"], prefix: asNobody(groups: [try getGID("provision")]))
            #expect(output.status == 0, "\(output)")
            #expect(output.stdout.contains("A1"))
        }

        @Test("a member of the socket's group may not cancel: exit 77 naming the admin group")
        func readerMayNotCancel() throws {
            let bench = try startedBench()
            defer { bench.close() }
            let output = try bench.cli(["cancel", "1"], prefix: asNobody(groups: [try getGID("provision")]))
            #expect(output.status == 77, "\(output)")
            #expect(output.stderr.contains("only root or members of the admin group"), "\(output)")
            for changing in [["reload"], ["flash", "/dev/null", "--image", "/dev/null"]] {
                let refused = try bench.cli(changing, prefix: asNobody(groups: [try getGID("provision")]))
                #expect(refused.status == 77, "\(changing): \(refused)")
            }
        }

        @Test("a user outside the socket's group cannot connect: exit 77, no permission")
        func outsiderCannotConnect() throws {
            let bench = try startedBench()
            defer { bench.close() }
            let output = try bench.cli(["status"], prefix: asNobody(groups: []))
            #expect(output.status == 77, "\(output)")
            #expect(output.stderr.contains("no permission"), "\(output)")
            // The admin group alone does not open the socket either: reading needs its group.
            let adminOnly = try bench.cli(["status"], prefix: asNobody(groups: [try getGID("provision-admin")]))
            #expect(adminOnly.status == 77, "\(adminOnly)")
        }

        @Test("a member of the admin group passes authorization for changing calls")
        func adminMayCancel() throws {
            let bench = try startedBench()
            defer { bench.close() }
            let groups = [try getGID("provision"), try getGID("provision-admin")]
            let output = try bench.cli(["cancel", "4242"], prefix: asNobody(groups: groups))
            // Authorized, and then told the truth: there is no such job (66, not 77).
            #expect(output.status == 66, "\(output)")
            #expect(output.stderr.contains("job 4242 is not running"), "\(output)")
            let reload = try bench.cli(["reload"], prefix: asNobody(groups: groups))
            #expect(reload.status == 0, "\(reload)")
        }
    }
}
