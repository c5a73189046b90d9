import ArgumentParser
import ControlProtocol
import Foundation
// The client moved to its own library so `provision board` shares it; every command file
// of this target sees it through this one import.
@_exported import ProvisionClient

/// Options every client command shares.
struct ClientOptions: ParsableArguments {
    @Option(help: "Control socket (default: $PROVISION_SOCKET or /run/provision/control.sock).")
    var socket: String?

    @Flag(help: "Print JSON instead of a table.")
    var json = false

    @Option(help: "Seconds to wait for provisiond's greeting and for each reply (not for a watch's events).")
    var timeout: Double = 30

    func validate() throws {
        guard timeout > 0, timeout <= 86_400 else { throw ValidationError("--timeout takes seconds, more than 0 and at most 86400") }
    }

    func connect() throws -> ControlClient {
        try ControlClient(path: ControlClient.socketPath(socket), replyTimeout: .milliseconds(Int64(timeout * 1000)))
    }
}

/// Runs a client command body, printing the error and exiting with its status.
func withClient(_ options: ClientOptions, _ body: (ControlClient) throws -> Void) throws {
    do {
        try body(try options.connect())
    } catch let e as CLIError {
        FileHandle.standardError.write(Data("provision: \(e.message)\n".utf8))
        throw ExitCode(e.status)
    }
}

func printJSON<T: Encodable>(_ value: T) throws {
    let e = JSONEncoder()
    e.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    e.dateEncodingStrategy = .iso8601
    print(String(decoding: try e.encode(value), as: UTF8.self))
}

/// Writes to stdout at once (watch output must not sit in a buffer when piped).
func emitLine(_ text: String) {
    FileHandle.standardOutput.write(Data((text + "\n").utf8))
}
