/// The bootloader image sent to the miniloader: a flasher U-Boot whose control DTB tells
/// it to write the flash image to eMMC boot0 and reset (tegra-rcm.md, "Writing U-Boot").
public struct FlasherPayload: Sendable {
    /// The boot image as it goes to eMMC boot0 (TegraBootImage: cbootimage's layout).
    public let flashImage: [UInt8]
    /// The U-Boot script placed in `/config/bootcmd`.
    public let script: String
    /// The whole bootloader download: flasher U-Boot, edited DTB, zero padding, flash image.
    public let bytes: [UInt8]
    /// `(nodtb + dtb + bss + 8191) & ~4095`: where the flash image starts, from the load address.
    public let paddedLength: Int
    public let flashImageAddress: UInt32
    public let readBackAddress: UInt32

    /// The payload as it will be for a board of this chip, its UID aside (every UID is the
    /// same length): the DTB parses, the environment's names and values are safe in the
    /// script, the image fits the address space. All of it is known before a board is touched.
    public static func check(_ inputs: TegraFlashInputs) throws {
        _ = try FlasherPayload(inputs: inputs, environment: inputs.substitutedEnvironment(uid: String(repeating: "0", count: inputs.chip.uidLength * 2)))
    }

    public static func paddedLength(nodtb: Int, dtb: Int, bss: Int) -> Int {
        (nodtb + dtb + bss + 8191) & ~4095
    }

    /// - Parameters:
    ///   - environment: per-unit `setenv` pairs, already substituted; names and values are checked
    ///     so they cannot break out of the script.
    public init(inputs: TegraFlashInputs, environment: [(name: String, value: String)]) throws {
        // The board keeps running its ordinary U-Boot (nodtb + its DTB, unedited) after reset,
        // described by the BCT's bootloader table so that the boot ROM finds it.
        flashImage = try inputs.bootImage().bytes
        let tree = try FlattenedDeviceTree(parsing: inputs.ubootDTB, name: inputs.ubootDTBName)
        let crc = CRC32.checksum(flashImage)
        let imageLength = flashImage.count
        func edited(imageAddress: UInt32, readBackAddress: UInt32) throws -> (script: String, dtb: [UInt8]) {
            let script = try FlasherScript.make(imageAddress: imageAddress, readBackAddress: readBackAddress,
                                                imageLength: imageLength, imageCRC: crc,
                                                scratchAddress: inputs.ramBase &+ 4, environment: environment)
            var copy = tree
            copy.setProperty(path: "/config", name: "bootdelay", value: FlattenedDeviceTree.u32Value(0xFFFF_FFFE))
            copy.setProperty(path: "/config", name: "bootcmd", value: FlattenedDeviceTree.stringValue(script))
            return (script, copy.serialized())
        }
        // The padded layout counts the DTB as sent (with the script in it), and the script names
        // addresses that depend on it. Addresses are printed at a fixed width, so the script's
        // length does not depend on them: one sizing pass, then the real one.
        let sizing = try edited(imageAddress: 0, readBackAddress: 0)
        paddedLength = Self.paddedLength(nodtb: inputs.ubootNoDTB.count, dtb: sizing.dtb.count,
                                         bss: inputs.ubootBSSSize)
        let imageAddress64 = UInt64(inputs.loadAddress) + UInt64(paddedLength)
        let readBack64 = imageAddress64 + UInt64(imageLength)
        guard readBack64 + UInt64(imageLength) <= UInt64(UInt32.max) else {
            throw TegraError(.invalidInput, "the flash image (\(imageLength) bytes) does not fit in the 32-bit address space above \(hex32(inputs.loadAddress))")
        }
        flashImageAddress = UInt32(imageAddress64)
        readBackAddress = UInt32(readBack64)
        let final = try edited(imageAddress: flashImageAddress, readBackAddress: readBackAddress)
        script = final.script
        let editedDTB = final.dtb
        precondition(editedDTB.count == sizing.dtb.count, "script length must not depend on addresses")

        let prefixLength = paddedLength
        var payload = inputs.ubootNoDTB + editedDTB
        payload += [UInt8](repeating: 0, count: prefixLength - payload.count)
        payload += flashImage
        bytes = payload
    }
}

/// The U-Boot hush script that writes the image and proves it, one `>>>` line per step.
public enum FlasherScript {
    public static func make(imageAddress: UInt32, readBackAddress: UInt32, imageLength: Int, imageCRC: UInt32,
                            scratchAddress: UInt32, environment: [(name: String, value: String)]) throws -> String {
        let blocks = UInt32(imageLength / 512)
        // U-Boot's crc32 stores its result big-endian; itest.l reads a native (little-endian) word.
        let swappedCRC = imageCRC.byteSwapped
        let length = hex32(UInt32(imageLength))
        func check(_ address: UInt32, _ what: String) -> [String] {
            ["echo '>>> checking CRC32 of \(what)'",
             "crc32 \(hex32(address)) \(length) \(hex32(scratchAddress))",
             "if itest.l *\(hex32(scratchAddress)) != \(hex32(swappedCRC)) ; then echo '>>> CRC32 mismatch in \(what): stopping, nothing more written' ; exit ; fi"]
        }
        var steps = check(imageAddress, "the image in RAM")
        steps += ["echo '>>> selecting eMMC boot0'", "mmc dev 0 1",
                  "echo '>>> writing \(blocks) blocks to eMMC boot0'",
                  "mmc write \(hex32(imageAddress)) 0 \(hex32(blocks))",
                  "echo '>>> reading back'",
                  "mmc read \(hex32(readBackAddress)) 0 \(hex32(blocks))"]
        steps += check(readBackAddress, "the eMMC read-back")
        steps += ["echo '>>> resetting the environment'", "env default -f -a"]
        for (name, value) in environment {
            guard !name.isEmpty, name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_" || $0 == "-" || $0 == ".") }) else {
                throw TegraError(.invalidInput, "environment variable name \"\(name)\" is not usable in U-Boot (letters, digits, _ - . only)")
            }
            guard !value.contains(where: { $0 == "'" || $0 == ";" || $0.isNewline || $0 == "\0" }) else {
                throw TegraError(.invalidInput, "value of environment variable \(name) contains ', ; or a line break, which would break the flasher script: \"\(value)\"")
            }
            steps += ["echo '>>> setting \(name)'", "setenv \(name) '\(value)'"]
        }
        steps += ["echo '>>> saving the environment'", "saveenv",
                  "echo '>>> done: resetting'", "reset"]
        return steps.joined(separator: " ; ")
    }
}
