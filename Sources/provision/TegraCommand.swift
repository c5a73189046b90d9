import ArgumentParser
import Foundation
import Station
import Tegra

/// `provision tegra …`: Tegra boards in USB recovery mode, offline (no daemon).
struct TegraCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tegra",
        abstract: "Flash or inspect an NVIDIA Tegra board in USB recovery mode.",
        subcommands: [Info.self, Flash.self, Image.self]
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
                    if probe.miniloaderRunning {
                        print("state:        the miniloader is running (an earlier `info --profile` or flash started it)")
                        if let uid = probe.uid { print("unit UID:     \(uid)") }
                    } else if let version = probe.rcmVersion {
                        print("unit UID:     \(probe.uid ?? "(already read by an earlier program: the boot ROM sends it once)")")
                        print("RCM version:  \(version >> 16).\(version & 0xFFFF) (zero-key CMAC accepted: no secure boot)")
                        print("(give --profile with a miniloader to read the full platform info)")
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

extension TegraCommand {
    /// `provision tegra image`: the eMMC boot image as cbootimage makes it, built natively, so a
    /// person (or a script) can compare it with `cbootimage -t124 IMG.cfg out.img` by hand.
    struct Image: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Build the eMMC boot image (BCT completed for U-Boot, then U-Boot) as cbootimage does.",
            discussion: """
                Equivalent to cbootimage with the image config `Version = <the chip's boot data version>; Bctcopy = 1; Bctfile = BCT; BootLoader = U-BOOT,LOAD,ENTRY,Complete;` (byte for byte). The BCT is the raw one `cbootimage -gbct` makes (empty bootloader table).

                With --profile, the soc, BCT, U-Boot (u-boot-nodtb + its DTB, as flashed) and addresses come from the profile; options given on the command line win.

                With --check, an existing image (made by cbootimage) is checked against the U-Boot instead (bootloader entry 0, its hash, the BCT signature); nothing is written.
                """)
        @Option(help: "Board profile (TOML) with a [tegra] table: defaults for everything else.")
        var profile: String?
        @Option(help: "tegra20, tegra30, tegra114 or tegra124 (default: the profile's soc, or what the BCT says).")
        var soc: String?
        @Option(help: "The raw BCT (from `cbootimage -gbct`).")
        var bct: String?
        @Option(help: "The bootloader to describe and append (e.g. u-boot-dtb-tegra.bin).")
        var uboot: String?
        @Option(help: "Load address of the bootloader (default: the profile's load_address).")
        var loadAddress: String?
        @Option(help: "Entry point of the bootloader (default: the load address).")
        var entry: String?
        @Option(help: "Number of BCT copies before the bootloader (cbootimage's Bctcopy).")
        var bctCopies: Int = 1
        @Option(help: "Where to write the image.")
        var output: String?
        @Option(help: "Check this existing image (made by cbootimage) against the U-Boot instead of building one.")
        var check: String?

        func validate() throws {
            if check == nil && output == nil { throw ValidationError("give --output FILE (or --check IMAGE)") }
        }

        func run() throws {
            do {
                let loaded = try profile.map { try TegraProfileFile.load($0) }
                let chip: TegraChip?
                if let soc {
                    guard let parsed = TegraChip(socName: soc) else {
                        throw TegraError(.invalidInput, "--soc \(soc) is not one of tegra20, tegra30, tegra114, tegra124")
                    }
                    chip = parsed
                } else {
                    chip = loaded.flatMap { TegraChip(socName: $0.soc) }
                }
                let ubootBytes: [UInt8]
                if let uboot {
                    ubootBytes = try Self.read(uboot, what: "--uboot")
                } else if let loaded {
                    ubootBytes = try loaded.loadInputs().flashedUBoot
                } else {
                    throw TegraError(.invalidInput, "give --uboot FILE (or --profile naming uboot and uboot_dtb)")
                }
                guard let load = try loadAddress.map({ try Self.address($0, "--load-address") }) ?? loaded?.loadAddress else {
                    throw TegraError(.invalidInput, "give --load-address (e.g. 0x80108000), or --profile with load_address")
                }
                let entryPoint = try entry.map { try Self.address($0, "--entry") } ?? load
                if let check {
                    let image = try TegraBootImage.check(image: try Self.read(check, what: "--check"), uboot: ubootBytes,
                                                         loadAddress: load, entryPoint: entryPoint, chip: chip, name: check)
                    print("\(check): \(image.layout.chip) boot image, Bootloader[0] = \(image.bootloader.length) bytes at block "
                          + "\(image.bootloader.startBlock), load \(String(format: "0x%08x", load)), entry \(String(format: "0x%08x", entryPoint)): matches the U-Boot")
                    return
                }
                let bctBytes: [UInt8]
                if let bct {
                    bctBytes = try Self.read(bct, what: "--bct")
                } else if let loaded {
                    bctBytes = try Self.read(loaded.resolve(loaded.bct), what: "the profile's bct")
                } else {
                    throw TegraError(.invalidInput, "give --bct FILE (the raw BCT from `cbootimage -gbct`), or --profile naming bct")
                }
                let image = try TegraBootImage.build(bct: bctBytes, uboot: ubootBytes, loadAddress: load, entryPoint: entryPoint,
                                                     chip: chip, bctCopies: bctCopies)
                guard let output else { return }
                guard FileManager.default.createFile(atPath: output, contents: Data(image.bytes)) else {
                    throw TegraError(.missingInput, "cannot write \(output)")
                }
                print("\(output): \(image.bytes.count) bytes, \(image.layout.chip) BCT (Bootloader used = \(image.bootloadersUsed)) "
                      + "+ \(image.bootloader.length) bytes of U-Boot at block \(image.bootloader.startBlock)")
            } catch let error as TegraError {
                throw TegraCommandFailure(error: error)
            }
        }

        static func read(_ path: String, what: String) throws -> [UInt8] {
            guard FileManager.default.fileExists(atPath: path) else { throw TegraError(.missingInput, "\(what): \(path) does not exist") }
            guard let data = FileManager.default.contents(atPath: path) else { throw TegraError(.missingInput, "\(what): cannot read \(path)") }
            return [UInt8](data)
        }

        static func address(_ text: String, _ option: String) throws -> UInt32 {
            let value = text.lowercased().hasPrefix("0x") ? UInt32(text.dropFirst(2), radix: 16) : UInt32(text)
            guard let value else { throw TegraError(.invalidInput, "\(option) \(text) is not a 32-bit address (e.g. 0x80108000)") }
            return value
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
