import ArgumentParser
import Board
import Foundation

struct BoardCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "board",
        abstract: "Serve the bench's live web board: one tile per slot, for a wall screen or a phone.",
        discussion: """
            A separate, unprivileged process: it reads the station through the control socket \
            (status, jobs, watch and lab-status only, as a member of group provision) and serves one page \
            with server-sent events on the address given. It never changes anything on the \
            station; provisiond itself keeps no IP socket. When the daemon is unreachable the \
            page says so and the board reconnects by itself.

            Example: provision board --listen 0.0.0.0:8080   (then open http://STATION:8080/)
            systemd: systemd/provision-board.service runs it as a dynamic user.
            """)

    @Option(help: ArgumentHelp("Where to serve: \(ListenAddress.usage).", valueName: "address:port"))
    var listen: String

    @Option(help: "Control socket (default: $PROVISION_SOCKET or /run/provision/control.sock).")
    var socket: String?

    func validate() throws {
        do { _ = try ListenAddress(parsing: listen) } catch { throw ValidationError(error.description) }
    }

    func run() async throws {
        let address = try ListenAddress(parsing: listen)
        let socketPath = ControlClient.socketPath(socket)
        do {
            try await BoardServer.run(listen: address, socketPath: socketPath) { bound in
                // Tests and scripts read the port from this line when they asked for port 0.
                FileHandle.standardOutput.write(Data("provision board: serving http://\(bound)/ for provisiond at \(socketPath)\n".utf8))
            }
        } catch {
            FileHandle.standardError.write(Data("provision board: cannot serve on \(address): \(error)\n".utf8))
            throw ExitCode(71)
        }
    }
}
