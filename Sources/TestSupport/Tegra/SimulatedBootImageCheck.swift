import Tegra

/// What happened when the simulated board reset after the flasher U-Boot wrote boot0.
public enum SimulatedBootVerdict: Sendable, Equatable {
    /// The boot ROM found the BCT, its signature, bootloader entry 0 and the bootloader's hash good.
    case booted(bootloaderLength: Int, loadAddress: UInt32)
    /// The boot ROM could not boot from boot0 and fell back to USB recovery mode (the reason).
    case fellBackToRecovery(String)
}

/// The simulated boot ROM's view of a BCT and of eMMC boot0, with its own offsets for the T124
/// (tegra-rcm.md, "The eMMC boot image"), its own CMAC, and its own reading of the flasher
/// script (the `mmc write` step names the image's RAM address and length).
enum SimulatedBootImageCheck {
    // T124 BCT facts, typed in from tegra-rcm.md.
    static let bctSize = 0x2000
    static let signatureAt = 0x310
    static let signedFrom = 0x6B0
    static let bootDataVersionAt = 0x6D0
    static let blockSizeLog2At = 0x6D4
    static let pageSizeLog2At = 0x6D8
    static let bootloaderUsedAt = 0x1B48
    static let entry0At = 0x1B4C
    static let entry0HashAt = 0x1B68

    /// Why the miniloader would refuse this BCT, or nil.
    static func bctProblem(_ bct: [UInt8], chip: TegraChip) -> String? {
        let spec = SimulatedChipSpec.of(chip)
        guard bct.count == spec.bctSize else { return "\(bct.count) bytes, a \(chip) BCT has \(spec.bctSize)" }
        guard chip == .t124 else { return nil }
        guard simulatorWord(bct, bootDataVersionAt) == 0x0040_0001 else {
            return "boot data version \(String(simulatorWord(bct, bootDataVersionAt), radix: 16)) is not T124's 40001"
        }
        guard SimulatorCrypto.cmac(Array(bct[signedFrom..<bctSize])) == Array(bct[signatureAt..<(signatureAt + 16)]) else {
            return "its AES-CMAC does not verify"
        }
        return nil
    }

    /// Runs the flasher script's `mmc write` (the image from RAM into boot0) and boots from boot0.
    static func flashAndBoot(payload: [UInt8], loadAddress: UInt32, chip: TegraChip) -> ([UInt8]?, SimulatedBootVerdict) {
        guard let (address, blocks) = mmcWrite(in: payload) else {
            return (nil, .fellBackToRecovery("the flasher script has no `mmc write ADDR 0 COUNT`"))
        }
        let start = Int(address) - Int(loadAddress)
        let length = Int(blocks) * 512
        guard start >= 0, start + length <= payload.count else {
            return (nil, .fellBackToRecovery("`mmc write` names RAM outside the downloaded bootloader"))
        }
        let image = Array(payload[start..<(start + length)])
        guard chip == .t124 else { return (image, .fellBackToRecovery("the simulator boots only T124 images")) }
        return (image, boot(image))
    }

    static func boot(_ image: [UInt8]) -> SimulatedBootVerdict {
        guard image.count >= bctSize else { return .fellBackToRecovery("boot0 holds \(image.count) bytes, less than a BCT") }
        let bct = Array(image[0..<bctSize])
        if let problem = bctProblem(bct, chip: .t124) { return .fellBackToRecovery("BCT: \(problem)") }
        guard simulatorWord(bct, bootloaderUsedAt) >= 1 else {
            return .fellBackToRecovery("the BCT describes no bootloader (bootloader_used = 0)")
        }
        let startBlock = Int(simulatorWord(bct, entry0At + 4))
        let startPage = Int(simulatorWord(bct, entry0At + 8))
        let length = Int(simulatorWord(bct, entry0At + 12))
        let load = simulatorWord(bct, entry0At + 16)
        let blockLog2 = Int(simulatorWord(bct, blockSizeLog2At)), pageLog2 = Int(simulatorWord(bct, pageSizeLog2At))
        guard blockLog2 < 30, pageLog2 < 30 else { return .fellBackToRecovery("implausible block/page size") }
        let start = startBlock << blockLog2 + startPage << pageLog2
        guard length > 0, start >= bctSize, start + length <= image.count else {
            return .fellBackToRecovery("bootloader entry 0 points at \(length) bytes from offset \(start), outside boot0's \(image.count)")
        }
        let bootloader = Array(image[start..<(start + length)])
        guard SimulatorCrypto.bootloaderHash(bootloader) == Array(bct[entry0HashAt..<(entry0HashAt + 16)]) else {
            return .fellBackToRecovery("the bootloader's hash does not match entry 0")
        }
        return .booted(bootloaderLength: length, loadAddress: load)
    }

    /// `mmc write 0xADDR 0 0xCOUNT` in the payload (the script sits in the DTB as plain text).
    static func mmcWrite(in payload: [UInt8]) -> (UInt32, UInt32)? {
        let needle = Array("mmc write 0x".utf8)
        guard payload.count > needle.count else { return nil }
        let found: Int? = payload.withUnsafeBufferPointer { bytes in
            var i = 0
            while i <= bytes.count - needle.count {
                if bytes[i] == needle[0] && (1..<needle.count).allSatisfy({ bytes[i + $0] == needle[$0] }) { return i }
                i += 1
            }
            return nil
        }
        guard let at = found else { return nil }
        let rest = String(decoding: payload[(at + needle.count - 2)..<min(payload.count, at + needle.count + 40)], as: UTF8.self)
        let words = rest.split(separator: " ")
        guard words.count >= 3, let address = UInt32(words[0].dropFirst(2), radix: 16), words[1] == "0",
              let count = UInt32(words[2].dropFirst(2).prefix { $0.isHexDigit }, radix: 16) else { return nil }
        return (address, count)
    }
}
