import ArgumentParser
import Foundation
import Station
import Tegra

/// `provision tegra …`: Tegra boards in USB recovery mode, offline (no daemon).
struct TegraCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tegra",
        abstract: "Flash or inspect an NVIDIA Tegra board in USB recovery mode.",
        subcommands: [Info.self, Flash.self]
    )

    struct DeviceOptions: ParsableArguments {
        @Option(help: "USB bus number of the device (with --address); default: the first recovery device.")
        var bus: UInt8?
        @Option(help: "USB device address on --bus.")
        var address: UInt8?
        @Option(help: "Per-transfer timeout in milliseconds.")
        var timeoutMs: Int = USBTransferRules.defaultTimeoutMilliseconds
        @Option(help: "Seconds to wait for the device to come back after the miniloader starts.")
        var reenumerationTimeout: Double = 10

        func source(productIDs: [UInt16]) throws -> LibUSBDeviceSource {
            switch (bus, address) {
            case let (bus?, address?): return LibUSBDeviceSource(selector: .busAddress(bus: bus, address: address), productIDs: productIDs)
            case (nil, nil): return LibUSBDeviceSource(selector: .first, productIDs: productIDs)
            default: throw ValidationError("--bus and --address go together")
            }
        }
    }

    struct Info: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print the platform info (UID, chip, boot device, operating mode) of a board in recovery mode.",
            discussion: "Only NVIDIA's miniloader answers platform-info requests, so the board profile naming it is needed; the board is left running the miniloader (reset it to return to recovery).")
        @Option(help: "Board profile (TOML) naming the miniloader.")
        var profile: String?
        @OptionGroup var device: DeviceOptions

        func run() throws {
            do {
                let loaded = try profile.map { try TegraProfileFile.load($0) }
                let source = try device.source(productIDs: loaded?.usbProductIDs ?? [])
                guard let loaded else {
                    // Without a profile there is no miniloader: ask the boot ROM only (UID, RCM version).
                    let probe = try TegraFlasher.probe(source: source, timeoutMilliseconds: device.timeoutMs)
                    print("device:       \(probe.location)")
                    print("chip:         \(probe.chip)")
                    if let uid = probe.uid, let version = probe.rcmVersion {
                        print("unit UID:     \(uid)")
                        print("RCM version:  \(version >> 16).\(version & 0xFFFF) (zero-key CMAC accepted: no secure boot)")
                        print("(give --profile with a miniloader to read the full platform info)")
                    } else {
                        print("state:        the miniloader is already running (no UID from the boot ROM)")
                    }
                    return
                }
                let inputs = try loaded.loadInputs()
                let (uid, info) = try TegraFlasher.platformInfo(source: source, chip: inputs.chip, miniloader: inputs.miniloader,
                                                                miniloaderEntry: inputs.miniloaderEntry,
                                                                timeoutMilliseconds: device.timeoutMs,
                                                                reenumerationTimeoutSeconds: device.reenumerationTimeout)
                print("unit UID: \(uid)")
                print(info.description)
            } catch let error as TegraError {
                throw TegraCommandFailure(error: error)
            }
        }
    }

    struct Flash: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write U-Boot to the eMMC of a board in recovery mode, as the board profile says.")
        @Option(help: "Board profile (TOML) with a [tegra] table, e.g. images/jetson-tk1/profile.toml.")
        var profile: String
        @Option(help: "Unit name for {unit} in the profile's [tegra.env] (default: the chip UID).")
        var unit: String?
        @OptionGroup var device: DeviceOptions

        func run() throws {
            do {
                let loaded = try TegraProfileFile.load(profile)
                let inputs = try loaded.loadInputs(unitName: unit)
                let source = try device.source(productIDs: inputs.usbProductIDs)
                let printer = TegraProgressPrinter()
                let flasher = TegraFlasher(source: source, inputs: inputs, timeoutMilliseconds: device.timeoutMs,
                                           reenumerationTimeoutSeconds: device.reenumerationTimeout) { phase, fraction in
                    printer.show(phase, fraction)
                }
                let report = try flasher.run()
                print("unit \(report.uid) (\(report.chip)): flasher U-Boot started after \(String(format: "%.1f", report.seconds)) s")
                print("it now writes \(report.flashImageBytes) bytes (CRC32 \(String(format: "%08x", report.flashImageCRC32))) to eMMC boot0, "
                      + "checks them, saves the environment and resets; its serial console shows each step as a >>> line")
            } catch let error as TegraError {
                throw TegraCommandFailure(error: error)
            }
        }
    }
}

/// Prints a line when a phase starts and at every 25 %.
final class TegraProgressPrinter: @unchecked Sendable {
    private let lock = NSLock()
    private var last: (TegraPhase, Int)?

    func show(_ phase: TegraPhase, _ fraction: Double) {
        let step = Int(fraction * 4)
        lock.lock()
        defer { lock.unlock() }
        guard last.map({ $0.0 != phase || $0.1 != step }) ?? true else { return }
        last = (phase, step)
        print("\(phase): \(Int(fraction * 100))%")
        fflush(nil)  // all streams: progress lines must show up when piped to a log
    }
}

/// A Tegra failure as the CLI reports it: the message on stderr, and a sysexits code:
/// 69 (EX_UNAVAILABLE) no device, 66 (EX_NOINPUT) missing input, 77 (EX_NOPERM), 65 (EX_DATAERR)
/// bad input, 1 otherwise.
func TegraCommandFailure(error: TegraError) -> ExitCode {
    FileHandle.standardError.write(Data("error: \(error.message)\n".utf8))
    switch error.kind {
    case .noDevice: return ExitCode(69)
    case .missingInput: return ExitCode(66)
    case .permissionDenied: return ExitCode(77)
    case .invalidInput: return ExitCode(65)
    default: return ExitCode(1)
    }
}

/// Reads a board profile with the station's own parser, so `provision tegra` and the daemon
/// accept exactly the same files (same keys, same chip defaults, same file:line errors).
enum TegraProfileFile {
    static func load(_ path: String) throws -> TegraProfile {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw TegraError(.missingInput, "cannot read the board profile \(path)")
        }
        let directory = (path as NSString).deletingLastPathComponent
        do {
            let profile = try Profile.parse(toml: String(decoding: data, as: UTF8.self), source: path,
                                            baseDirectory: directory.isEmpty ? "." : directory)
            guard profile.tegra != nil else {
                throw TegraError(.invalidInput, "\(path): no [tegra] table; is this a Tegra board profile?")
            }
            return try profile.tegraProfile()
        } catch let error as ConfigError {
            throw TegraError(.invalidInput, error.description)
        }
    }
}
