import ArgumentParser
import BlockDevices
import Dispatch
import Foundation
import ImageIO
import Pipeline

/// `provision write IMAGE DEVICE`: the write engine offline, no daemon needed.
struct WriteCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "write",
        abstract: "Write an image to a card (or file), then verify it by reading it back.",
        discussion: """
        IMAGE may be raw or compressed with gzip, xz, zstd, bzip2, lz4 or lzop, or a zip or tar \
        (itself compressed or not) holding one disk image; the format is found by its first \
        bytes, not its name. Other containers (7z, rar, qcow2, vmdk, dmg, ...) are refused \
        before anything is written; --raw writes a file as it is. IMAGE may be an http:// or \
        https:// URL: it is streamed as it downloads, and resumed after a dropped connection \
        where the server allows ranges. A bmap file next to the image (IMAGE.bmap, or with \
        extensions stripped, like bmaptool; on the server too for a URL) makes provision write \
        and verify only the mapped blocks. A file target is emptied first and ends up equal to \
        the image.

        DEVICE must be a whole removable disk (USB or MMC) or a loop device, not mounted and not \
        in use; provision refuses anything else and says why. It shows the device and asks \
        before writing unless --yes is given.

        Exit status: 0 written and verified; 64 usage; 65 image or bmap corrupt; 66 image \
        missing; 73 card too small; 74 I/O error, card removed, or verification failed; \
        75 device busy; 77 refused by the safety policy, refused as counterfeit by the capacity \
        probe, or write-protected; 130 cancelled.
        """)

    @Argument(help: "Image file or http(s):// URL: raw, .gz, .xz, .zst, .bz2, .lz4, .lzo, .zip or a tar of one image.")
    var image: String

    @Argument(help: "Target: a whole-disk block device (/dev/sdX, /dev/mmcblkN, /dev/loopN) or a file.")
    var device: String

    @Option(help: "Use this bmap file (or URL).")
    var bmap: String?

    @Flag(name: .customLong("nobmap"), help: "Ignore any bmap file and write the whole image.")
    var noBmap = false

    @Flag(help: "Write IMAGE as it is, even if its first bytes look like an archive or a compressed file.")
    var raw = false

    @Flag(name: .customLong("no-verify"), help: "Skip reading the card back after writing.")
    var noVerify = false

    @Flag(name: .customLong("no-probe"), help: "Skip the capacity probe: by default provision first checks that a card stores what it claims (tagged blocks over its whole size, read back and restored) and refuses a counterfeit one.")
    var noProbe = false

    @Flag(name: .customLong("follow-symlinks"), help: "Write where TARGET points if it is a symbolic link (by default a link is refused: one planted where a file was expected must not redirect the write).")
    var followSymlinks = false

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
        var job = CardJob(image: image, target: device, policy: SafetyPolicy(mode: .offline))
        job.followSymlinks = followSymlinks
        job.verify = !noVerify
        job.probeCapacity = !noProbe
        // What the probe overwrites waits in an unlinked file there, not in memory, as the
        // station keeps it in its cache directory: the probe's window grows with the square
        // root of the card (8 MiB on a 16 GiB card: peak anonymous memory 35.4 → 31.4 MiB).
        job.probeStashDirectory = ProcessInfo.processInfo.environment["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/var/tmp"
        job.chunkSize = Int(chunkBytes!)  // validate() checked it
        job.bmap = noBmap ? .none : (bmap.map { BmapChoice.file($0) } ?? .discover)
        job.progressInterval = .zero
        job.forceRaw = raw
        if !noBmap, let path = bmap ?? Bmap.locate(forImage: image), let loaded = try? Bmap.load(path: path) {
            output.note("using bmap \(path): \(ByteCount.human(loaded.mappedBytes)) of \(ByteCount.human(loaded.imageSize)) mapped")
        }
        let image = image, device = device, yes = yes
        // Asked after the device is open and judged on its descriptor, so what is shown is
        // what will be written; the exclusive open keeps it from being mounted meanwhile.
        job.confirm = { facts in
            guard let facts, !yes else { return }
            try Self.confirm(image: image, device: device, facts: facts)
        }
        let pipeline = CardPipeline(job: job, sink: PrinterSink(output: output, image: image, device: device))
        let cancel = pipeline.cancellation
        signal(SIGINT, SIG_IGN)
        let sigint = DispatchSource.makeSignalSource(signal: SIGINT, queue: .global())
        sigint.setEventHandler { cancel.cancel() }
        sigint.resume()
        defer { sigint.cancel(); signal(SIGINT, SIG_DFL) }

        switch pipeline.run() {
        case .done(let result):
            if let probe = result.probe {
                output.note("capacity probe: \(probe.blocks) blocks over \(ByteCount.human(probe.claimedBytes)) came back as written in \(String(format: "%.3f", probe.seconds)) s")
            }
            if let repaired = result.write.repairedAt {
                output.note("repaired: the card returned other data at byte \(repaired.map(String.init).joined(separator: ", byte ")) once and the image after one rewrite")
            }
            output.finish(result: result.write, device: device)
        case .cancelled(let message):
            output.fail(message: message, code: ImageIOError.Code.cancelled.rawValue)
            throw ExitCode(130)
        case .failed(let failure):
            switch failure.kind {
            case .image(let code):
                output.fail(message: failure.message, code: code.rawValue)
                throw ExitCode(Self.exitStatus(code))
            case .refused:
                output.fail(message: failure.message, code: "refused")
                throw ExitCode(77)
            case .accounts, .check:
                output.fail(message: failure.message, code: "provisioning")
                throw ExitCode(74)
            }
        }
    }

    private static func confirm(image: String, device: String, facts: DeviceFacts) throws {
        guard isatty(STDIN_FILENO) != 0 else {
            throw CardFailure(.refused, "not asking on a non-terminal: pass --yes to write \(device) (\(facts.summary))")
        }
        FileHandle.standardError.write(Data("Write \(image) to \(device): \(facts.summary)?\nEverything on it will be lost. Type 'yes' to continue: ".utf8))
        guard let answer = readLine(), ["yes", "y"].contains(answer.lowercased()) else {
            throw CardFailure(.refused, "not confirmed; nothing was written")
        }
    }

    static func exitStatus(_ code: ImageIOError.Code) -> Int32 {
        switch code {
        case .imageMissing, .imageUnreadable: return 66
        case .compressedStreamCorrupt, .compressedStreamTruncated, .imageCorrupt, .bmapInvalid, .bmapMismatch, .unsupportedFormat: return 65
        case .deviceTooSmall: return 73
        case .deviceReadOnly: return 77
        case .deviceBusy: return 75
        case .deviceRemoved, .ioError, .verifyMismatch, .deviceChanged: return 74
        case .cancelled: return 130
        case .invalidArgument: return 64
        }
    }
}

/// The pipeline's reports on the terminal (or as JSON lines).
private struct PrinterSink: CardReportSink {
    let output: ProgressPrinter
    let image: String
    let device: String

    func receive(_ report: CardReport) {
        switch report {
        case .stage(.writing, let note, _, let p):
            output.note("writing \(image)\(note.map { " (\($0))" } ?? "") to \(device)")
            if let p { output.progress(p) }
        case .stage(_, let note, _, let p):
            if let note { output.note(note) }
            if let p { output.progress(p) }
        case .progress(let p): output.progress(p)
        case .accounts, .finished: break
        }
    }
}
