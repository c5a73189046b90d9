import Foundation

/// Runs a peer tool and captures what it says; tests assert on the exit status and output.
struct CommandResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

@discardableResult
func run(_ arguments: [String], environment: [String: String] = [:], directory: URL? = nil) throws -> CommandResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = arguments
    var env = ProcessInfo.processInfo.environment
    env["PATH"] = (env["PATH"] ?? "/usr/bin:/bin") + ":/usr/sbin:/sbin"
    for (key, value) in environment { env[key] = value }
    process.environment = env
    if let directory { process.currentDirectoryURL = directory }
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    // Read stderr on its own thread while stdout is read here, so a chatty tool cannot
    // block on a full pipe.
    let errors = DataBox()
    let done = DispatchGroup()
    done.enter()
    Thread.detachNewThread {
        errors.data = err.fileHandleForReading.readDataToEndOfFile()
        done.leave()
    }
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    done.wait()
    return CommandResult(status: process.terminationStatus,
                         stdout: String(decoding: outData, as: UTF8.self),
                         stderr: String(decoding: errors.data, as: UTF8.self))
}

private final class DataBox: @unchecked Sendable {
    var data = Data()
}

/// The repository checkout these tests belong to.
let repositoryRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent()
let imagesDirectory = repositoryRoot.appendingPathComponent("images")
let buildScript = imagesDirectory.appendingPathComponent("build-test-image").path

/// A fresh directory removed by the caller's `defer`.
func makeTemporaryDirectory(_ label: String) throws -> URL {
    let url = FileManager.default.temporaryDirectory
        .appendingPathComponent("provision-\(label)-\(UUID().uuidString.prefix(8))")
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    return url
}

func sha256(_ path: String) throws -> String {
    let result = try run(["sha256sum", path])
    guard result.status == 0, let hash = result.stdout.split(separator: " ").first else {
        throw CommandFailure(command: "sha256sum \(path)", result: result)
    }
    return String(hash)
}

struct CommandFailure: Error, CustomStringConvertible {
    var command: String
    var result: CommandResult
    var description: String { "\(command) exited \(result.status): \(result.stderr)" }
}

@discardableResult
func runChecked(_ arguments: [String], environment: [String: String] = [:]) throws -> CommandResult {
    let result = try run(arguments, environment: environment)
    guard result.status == 0 else { throw CommandFailure(command: arguments.joined(separator: " "), result: result) }
    return result
}

/// Builds the test image into `directory` and returns the paths it printed as outputs.
@discardableResult
func buildTestImage(into directory: URL, extra: [String] = [], epoch: String = "1700000000",
                    asUser user: String? = nil) throws -> [String] {
    var command = [buildScript, "--out", directory.path] + extra
    if let user { command = ["runuser", "-u", user, "--"] + command }
    let result = try run(command, environment: ["SOURCE_DATE_EPOCH": epoch, "TMPDIR": directory.path])
    guard result.status == 0 else { throw CommandFailure(command: command.joined(separator: " "), result: result) }
    return result.stdout.split(separator: "\n").compactMap { line in
        line.hasPrefix("output: ") ? String(line.dropFirst("output: ".count)) : nil
    }
}
