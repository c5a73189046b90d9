import ArgumentParser
import BlockDevices
import Dispatch
import Foundation
import ImageIO

/// `provision write IMAGE DEVICE`: the write engine offline, no daemon needed.
struct WriteCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "write",
        abstract: "Write an image to a card (or file), then verify it by reading it back.",
        discussion: """
        IMAGE may be raw or compressed with gzip, xz or zstd (found by its first bytes, not its \
        name). A bmap file next to the image (IMAGE.bmap, or with extensions stripped, like \
        bmaptool) makes provision write and verify only the mapped blocks.

        DEVICE must be a whole removable disk (USB or MMC) or a loop device, not mounted and not \
        in use; provision refuses anything else and says why. It shows the device and asks \
        before writing unless --yes is given.

        Exit status: 0 written and verified; 64 usage; 65 image or bmap corrupt; 66 image \
        missing; 73 card too small; 74 I/O error, card removed, or verification failed; \
        75 device busy; 77 refused by the safety policy or write-protected; 130 cancelled.
        """)

    @Argument(help: "Image file: raw, .gz, .xz or .zst.")
    var image: String

    @Argument(help: "Target: a whole-disk block device (/dev/sdX, /dev/mmcblkN, /dev/loopN) or a file.")
    var device: String

    @Option(help: "Use this bmap file.")
    var bmap: String?

    @Flag(name: .customLong("nobmap"), help: "Ignore any bmap file and write the whole image.")
    var noBmap = false

    @Flag(name: .customLong("no-verify"), help: "Skip reading the card back after writing.")
    var noVerify = false

    @Flag(name: [.customShort("y"), .long], help: "Do not ask for confirmation.")
    var yes = false

    @Flag(help: "Print one JSON object per progress event and a final result object.")
    var json = false

    @Option(help: "Bytes per write (default 4MiB).")
    var chunkSize: String = "4MiB"

    private var chunkBytes: UInt64? { try? ByteCount.parse(chunkSize) }

    func validate() throws {
        if noBmap && bmap != nil { throw ValidationError("--bmap and --nobmap contradict each other") }
        guard let c = chunkBytes, c >= 4096, c % 4096 == 0, c <= 64 << 20 else {
            throw ValidationError("--chunk-size must be a multiple of 4KiB up to 64MiB, e.g. 4MiB")
        }
    }

    func run() throws {
        let output = ProgressPrinter(mode: json ? .json : (isatty(STDERR_FILENO) != 0 ? .terminal : .lines))
        do {
            let result = try perform(output: output)
            output.finish(result: result, device: device)
        } catch let error as ImageIOError {
            output.fail(message: error.message, code: error.code.rawValue)
            throw ExitCode(Self.exitStatus(error.code))
        } catch let error as RefusedError {
            output.fail(message: error.message, code: "refused")
            throw ExitCode(77)
        }
    }

    private func perform(output: ProgressPrinter) throws -> WriteResult {
        let source = try ImageSource(path: image)
        var options = WriteOptions()
        options.verify = !noVerify
        options.chunkSize = Int(chunkBytes!)  // validate() checked it
        if !noBmap, let path = bmap ?? Bmap.locate(forImage: image) {
            options.bmap = try Bmap.load(path: path)
            output.note("using bmap \(path): \(ByteCount.human(options.bmap!.mappedBytes)) of \(ByteCount.human(options.bmap!.imageSize)) mapped")
        }
        let needed = options.bmap?.imageSize ?? source.uncompressedSizeHint

        var facts: DeviceFacts?
        var st = stat()
        if stat(device, &st) == 0, (st.st_mode & S_IFMT) == S_IFBLK {
            let f = try DeviceFacts.read(path: device)
            let refusals = SafetyPolicy(mode: .offline).refusals(for: f, minimumSize: needed)
            if let tooSmall = refusals.first(where: { $0.rule == .tooSmall }), refusals.count == 1 {
                throw ImageIOError(.deviceTooSmall, tooSmall.reason + " (\(device))")
            }
            if let ro = refusals.first(where: { $0.rule == .readOnly }), refusals.count == 1 {
                throw ImageIOError(.deviceReadOnly, "\(device) is \(ro.reason)")
            }
            if !refusals.isEmpty {
                throw RefusedError(message: "refusing to write \(device) (\(f.summary)):\n" + refusals.map { "  - \($0.reason)" }.joined(separator: "\n"))
            }
            facts = f
            if !yes { try confirm(facts: f) }
        }

        let cancel = options.cancellation
        signal(SIGINT, SIG_IGN)
        let sigint = DispatchSource.makeSignalSource(signal: SIGINT, queue: .global())
        sigint.setEventHandler { cancel.cancel() }
        sigint.resume()
        defer { sigint.cancel(); signal(SIGINT, SIG_DFL) }

        let target = try WriteTarget.open(path: device)
        if let facts {
            // The node could now name other media (card swapped while we asked).
            options.beforeFirstWrite = { t in
                if t.deviceNumber != facts.deviceNumber || (t.diskSequence != nil && facts.diskSequence != nil && t.diskSequence != facts.diskSequence) {
                    throw ImageIOError(.deviceChanged, "\(t.path) now holds a different card than the one checked; nothing was written")
                }
            }
        }
        output.note("writing \(image) (\(source.format.rawValue)) to \(device)")
        return try ImageWriter.write(source: source, to: target, options: options) { output.progress($0) }
    }

    private func confirm(facts: DeviceFacts) throws {
        guard isatty(STDIN_FILENO) != 0 else {
            throw RefusedError(message: "not asking on a non-terminal: pass --yes to write \(device) (\(facts.summary))")
        }
        FileHandle.standardError.write(Data("Write \(image) to \(device): \(facts.summary)?\nEverything on it will be lost. Type 'yes' to continue: ".utf8))
        guard let answer = readLine(), ["yes", "y"].contains(answer.lowercased()) else {
            throw RefusedError(message: "not confirmed; nothing was written")
        }
    }

    static func exitStatus(_ code: ImageIOError.Code) -> Int32 {
        switch code {
        case .imageMissing, .imageUnreadable: return 66
        case .compressedStreamCorrupt, .compressedStreamTruncated, .imageCorrupt, .bmapInvalid, .bmapMismatch: return 65
        case .deviceTooSmall: return 73
        case .deviceReadOnly: return 77
        case .deviceBusy: return 75
        case .deviceRemoved, .ioError, .verifyMismatch, .deviceChanged: return 74
        case .cancelled: return 130
        case .invalidArgument: return 64
        }
    }
}

struct RefusedError: Error { let message: String }
