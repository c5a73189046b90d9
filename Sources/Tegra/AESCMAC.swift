import Crypto
import _CryptoExtras
import Foundation

/// AES-128-CMAC (RFC 4493), the signature Tegra boot ROMs check on RCM messages of
/// boards without secure boot (key all zero).
///
/// swift-crypto has no CMAC, but CMAC is CBC-MAC with a twist on the last block, so
/// `AES._CBC` with a zero IV and no padding gives both the subkey block function and the
/// chained MAC in one call over the whole message.
public enum AESCMAC {
    /// The key of boards without secure boot.
    public static let zeroKey = [UInt8](repeating: 0, count: 16)

    /// The 16-byte CMAC of `message` under the 16-byte `key` (AES-128).
    public static func mac(_ message: [UInt8], key keyBytes: [UInt8] = zeroKey) throws -> [UInt8] {
        let key = SymmetricKey(data: keyBytes)
        let zeroIV = try AES._CBC.IV(ivBytes: [UInt8](repeating: 0, count: 16))
        let (k1, k2) = try subkeys(key)

        // Last block: complete → XOR K1; partial or empty → pad 0x80 00… and XOR K2.
        let blockCount = max(1, (message.count + 15) / 16)
        let lastIsComplete = !message.isEmpty && message.count % 16 == 0
        var padded = message
        if !lastIsComplete {
            padded.append(0x80)
            padded.append(contentsOf: [UInt8](repeating: 0, count: blockCount * 16 - padded.count))
        }
        let subkey = lastIsComplete ? k1 : k2
        let lastStart = (blockCount - 1) * 16
        for i in 0..<16 { padded[lastStart + i] ^= subkey[i] }

        let chained = try AES._CBC.encrypt(padded, using: key, iv: zeroIV, noPadding: true)
        return [UInt8](chained.suffix(16))
    }

    /// The hash cbootimage stores for a bootloader (and, over a whole number of blocks, for a BCT).
    ///
    /// cbootimage pads the data with `0x80 0…` up to a whole AES block, as RFC 4493 does, but then
    /// always XORs K1 into the last block, where RFC 4493 takes K2 for a padded block. For lengths
    /// that are a multiple of 16 both agree; for the others only this one matches what cbootimage
    /// writes into `Bootloader[0]`'s hash (and what the boot ROM checks against it).
    public static func tegraBootHash(_ data: [UInt8], key keyBytes: [UInt8] = zeroKey) throws -> [UInt8] {
        let key = SymmetricKey(data: keyBytes)
        let zeroIV = try AES._CBC.IV(ivBytes: [UInt8](repeating: 0, count: 16))
        let (k1, _) = try subkeys(key)
        var padded = data
        if padded.count % 16 != 0 {
            padded.append(0x80)
            padded.append(contentsOf: [UInt8](repeating: 0, count: (16 - padded.count % 16) % 16))
        }
        guard !padded.isEmpty else { return [UInt8](repeating: 0, count: 16) }
        let lastStart = padded.count - 16
        for i in 0..<16 { padded[lastStart + i] ^= k1[i] }
        let chained = try AES._CBC.encrypt(padded, using: key, iv: zeroIV, noPadding: true)
        return [UInt8](chained.suffix(16))
    }

    /// K1 and K2 of RFC 4493 (L = AES(key, 0), doubled once and twice).
    private static func subkeys(_ key: SymmetricKey) throws -> ([UInt8], [UInt8]) {
        let zeroIV = try AES._CBC.IV(ivBytes: [UInt8](repeating: 0, count: 16))
        let l = [UInt8](try AES._CBC.encrypt([UInt8](repeating: 0, count: 16), using: key, iv: zeroIV, noPadding: true))
        let k1 = doubled(l)
        return (k1, doubled(k1))
    }

    /// Multiplication by x in GF(2^128) as RFC 4493 derives K1 and K2.
    private static func doubled(_ block: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 16)
        var carry: UInt8 = 0
        for i in stride(from: 15, through: 0, by: -1) {
            out[i] = (block[i] << 1) | carry
            carry = block[i] >> 7
        }
        if block[0] & 0x80 != 0 { out[15] ^= 0x87 }
        return out
    }
}
