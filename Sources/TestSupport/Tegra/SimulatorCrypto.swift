/// AES-128 (FIPS-197, encryption only) and AES-CMAC (RFC 4493), written for the simulator from
/// the two standards, so that the boot ROM it plays checks the host's signatures with code of
/// its own: a bug shared by the host's `AESCMAC` and this checker would have to be written twice.
/// Slow and simple on purpose; the S-box is derived (inverse in GF(2⁸), then the affine map)
/// rather than typed in.
public enum SimulatorCrypto {
    static func multiply(_ a: UInt8, _ b: UInt8) -> UInt8 {
        var a = a, b = b, product: UInt8 = 0
        while b != 0 {
            if b & 1 != 0 { product ^= a }
            a = (a << 1) ^ (a & 0x80 != 0 ? 0x1B : 0)
            b >>= 1
        }
        return product
    }

    static let sbox: [UInt8] = (0..<256).map { value in
        let x = UInt8(value)
        let inverse = x == 0 ? 0 : (1...255).map(UInt8.init).first { multiply(x, $0) == 1 }!
        func rotl(_ v: UInt8, _ n: UInt8) -> UInt8 { (v << n) | (v >> (8 - n)) }
        return inverse ^ rotl(inverse, 1) ^ rotl(inverse, 2) ^ rotl(inverse, 3) ^ rotl(inverse, 4) ^ 0x63
    }

    static let xtime: [UInt8] = (0..<256).map { multiply(UInt8($0), 2) }

    /// An expanded AES-128 key: 11 round keys of 16 bytes, in state order.
    struct Schedule {
        let bytes: [UInt8]

        init(_ key: [UInt8]) {
            precondition(key.count == 16)
            var words = (0..<4).map { Array(key[(4 * $0)..<(4 * $0 + 4)]) }
            var rcon: UInt8 = 1
            for i in 4..<44 {
                var temp = words[i - 1]
                if i % 4 == 0 {
                    temp = [temp[1], temp[2], temp[3], temp[0]].map { sbox[Int($0)] }
                    temp[0] ^= rcon
                    rcon = multiply(rcon, 2)
                }
                words.append(zip(words[i - 4], temp).map { $0 ^ $1 })
            }
            bytes = words.flatMap { $0 }
        }

        /// Encrypts the 16 bytes at `state` in place; `state[r + 4c]` is row r, column c.
        /// Pointers and tables, not arrays: the simulator MACs megabytes in debug builds.
        func encrypt(_ state: UnsafeMutablePointer<UInt8>) {
            bytes.withUnsafeBufferPointer { keyBuffer in
                sbox.withUnsafeBufferPointer { sboxBuffer in
                    xtime.withUnsafeBufferPointer { xtimeBuffer in
                        let key = keyBuffer.baseAddress!, s = sboxBuffer.baseAddress!, x2 = xtimeBuffer.baseAddress!
                        for i in 0..<16 { state[i] ^= key[i] }
                        var shifted = (UInt8(0), UInt8(0), UInt8(0), UInt8(0), UInt8(0), UInt8(0), UInt8(0), UInt8(0),
                                       UInt8(0), UInt8(0), UInt8(0), UInt8(0), UInt8(0), UInt8(0), UInt8(0), UInt8(0))
                        withUnsafeMutableBytes(of: &shifted) { raw in
                            let t = raw.baseAddress!.assumingMemoryBound(to: UInt8.self)
                            for round in 1...10 {
                                // SubBytes and ShiftRows together: row r moves left by r columns.
                                for c in 0..<4 {
                                    for r in 0..<4 { t[r + 4 * c] = s[Int(state[r + 4 * ((c + r) & 3)])] }
                                }
                                if round != 10 {
                                    for c in 0..<4 {
                                        let a0 = t[4 * c], a1 = t[4 * c + 1], a2 = t[4 * c + 2], a3 = t[4 * c + 3]
                                        let all = a0 ^ a1 ^ a2 ^ a3
                                        // 2a ^ 3b ^ c ^ d = a ^ all ^ 2(a ^ b), and so on round the column.
                                        state[4 * c] = a0 ^ all ^ x2[Int(a0 ^ a1)]
                                        state[4 * c + 1] = a1 ^ all ^ x2[Int(a1 ^ a2)]
                                        state[4 * c + 2] = a2 ^ all ^ x2[Int(a2 ^ a3)]
                                        state[4 * c + 3] = a3 ^ all ^ x2[Int(a3 ^ a0)]
                                    }
                                } else {
                                    for i in 0..<16 { state[i] = t[i] }
                                }
                                let k = key + 16 * round
                                for i in 0..<16 { state[i] ^= k[i] }
                            }
                        }
                    }
                }
            }
        }

        func encrypt(_ block: [UInt8]) -> [UInt8] {
            var out = block
            out.withUnsafeMutableBufferPointer { encrypt($0.baseAddress!) }
            return out
        }

        /// CBC-MAC with a zero IV over whole blocks, `tweak` XORed into the last block first.
        func chain(_ data: [UInt8], lastBlockTweak tweak: [UInt8]) -> [UInt8] {
            precondition(data.count % 16 == 0 && !data.isEmpty)
            var x = [UInt8](repeating: 0, count: 16)
            let blocks = data.count / 16
            x.withUnsafeMutableBufferPointer { xBuffer in
                data.withUnsafeBufferPointer { dataBuffer in
                    let state = xBuffer.baseAddress!, input = dataBuffer.baseAddress!
                    for block in 0..<blocks {
                        for i in 0..<16 { state[i] ^= input[16 * block + i] }
                        if block == blocks - 1 { for i in 0..<16 { state[i] ^= tweak[i] } }
                        encrypt(state)
                    }
                }
            }
            return x
        }
    }

    public static func aes128(block: [UInt8], key: [UInt8]) -> [UInt8] { Schedule(key).encrypt(block) }

    /// RFC 4493 section 2.3: K1 = L·x, K2 = L·x², L = AES(K, 0¹²⁸).
    static func subkeys(_ schedule: Schedule) -> (k1: [UInt8], k2: [UInt8]) {
        func double(_ v: [UInt8]) -> [UInt8] {
            var out = (0..<16).map { i in (v[i] << 1) | (i < 15 ? v[i + 1] >> 7 : 0) }
            if v[0] & 0x80 != 0 { out[15] ^= 0x87 }
            return out
        }
        let l = schedule.encrypt([UInt8](repeating: 0, count: 16))
        let k1 = double(l)
        return (k1, double(k1))
    }

    /// AES-CMAC of RFC 4493 (section 2.4): a complete last block takes K1, a padded one K2.
    public static func cmac(_ message: [UInt8], key: [UInt8] = [UInt8](repeating: 0, count: 16)) -> [UInt8] {
        let schedule = Schedule(key)
        let (k1, k2) = subkeys(schedule)
        if !message.isEmpty && message.count % 16 == 0 { return schedule.chain(message, lastBlockTweak: k1) }
        let padded = message + [0x80] + [UInt8](repeating: 0, count: 15 - message.count % 16)
        return schedule.chain(padded, lastBlockTweak: k2)
    }

    /// What a Tegra boot ROM compares with a BCT's bootloader hash, as cbootimage computes it:
    /// `0x80 0…` padding to whole blocks, then CBC-MAC with K1 on the last block even when it was
    /// padded (RFC 4493 would take K2 there). Inferred from cbootimage's crypto.c, not observed on a ROM.
    public static func bootloaderHash(_ data: [UInt8]) -> [UInt8] {
        let schedule = Schedule([UInt8](repeating: 0, count: 16))
        let (k1, _) = subkeys(schedule)
        var padded = data
        if padded.count % 16 != 0 { padded += [0x80] + [UInt8](repeating: 0, count: 15 - padded.count % 16) }
        guard !padded.isEmpty else { return [UInt8](repeating: 0, count: 16) }
        return schedule.chain(padded, lastBlockTweak: k1)
    }
}
