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

    /// The 11 round keys of AES-128, 16 bytes each, in state order.
    static func roundKeys(_ key: [UInt8]) -> [[UInt8]] {
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
        return (0..<11).map { round in words[(4 * round)..<(4 * round + 4)].flatMap { $0 } }
    }

    /// One block; `state[r + 4c]` is row r, column c, as the input bytes come.
    static func encrypt(_ block: [UInt8], _ keys: [[UInt8]]) -> [UInt8] {
        var state = zip(block, keys[0]).map { $0 ^ $1 }
        for round in 1...10 {
            state = state.map { sbox[Int($0)] }
            var shifted = state
            for r in 0..<4 { for c in 0..<4 { shifted[r + 4 * c] = state[r + 4 * ((c + r) % 4)] } }
            state = shifted
            if round != 10 {
                for c in 0..<4 {
                    let a = Array(state[(4 * c)..<(4 * c + 4)])
                    state[4 * c] = multiply(a[0], 2) ^ multiply(a[1], 3) ^ a[2] ^ a[3]
                    state[4 * c + 1] = a[0] ^ multiply(a[1], 2) ^ multiply(a[2], 3) ^ a[3]
                    state[4 * c + 2] = a[0] ^ a[1] ^ multiply(a[2], 2) ^ multiply(a[3], 3)
                    state[4 * c + 3] = multiply(a[0], 3) ^ a[1] ^ a[2] ^ multiply(a[3], 2)
                }
            }
            state = zip(state, keys[round]).map { $0 ^ $1 }
        }
        return state
    }

    public static func aes128(block: [UInt8], key: [UInt8]) -> [UInt8] { encrypt(block, roundKeys(key)) }

    /// RFC 4493 section 2.3: K1 = L·x, K2 = L·x², L = AES(K, 0¹²⁸).
    static func subkeys(_ keys: [[UInt8]]) -> (k1: [UInt8], k2: [UInt8]) {
        func double(_ v: [UInt8]) -> [UInt8] {
            var out = (0..<16).map { i in (v[i] << 1) | (i < 15 ? v[i + 1] >> 7 : 0) }
            if v[0] & 0x80 != 0 { out[15] ^= 0x87 }
            return out
        }
        let l = encrypt([UInt8](repeating: 0, count: 16), keys)
        let k1 = double(l)
        return (k1, double(k1))
    }

    /// AES-CMAC of RFC 4493 (section 2.4).
    public static func cmac(_ message: [UInt8], key: [UInt8] = [UInt8](repeating: 0, count: 16)) -> [UInt8] {
        let keys = roundKeys(key)
        let (k1, k2) = subkeys(keys)
        let blocks = max(1, (message.count + 15) / 16)
        let complete = !message.isEmpty && message.count % 16 == 0
        var last = Array(message[((blocks - 1) * 16)...])
        if complete {
            last = zip(last, k1).map { $0 ^ $1 }
        } else {
            last += [0x80] + [UInt8](repeating: 0, count: 15 - last.count)
            last = zip(last, k2).map { $0 ^ $1 }
        }
        var x = [UInt8](repeating: 0, count: 16)
        for i in 0..<(blocks - 1) {
            x = encrypt(zip(x, message[(16 * i)..<(16 * i + 16)]).map { $0 ^ $1 }, keys)
        }
        return encrypt(zip(x, last).map { $0 ^ $1 }, keys)
    }

    /// What a Tegra boot ROM compares with a BCT's bootloader hash, as cbootimage computes it:
    /// `0x80 0…` padding to whole blocks, then CBC-MAC with K1 on the last block even when it was
    /// padded (RFC 4493 would take K2 there). Inferred from cbootimage's crypto.c, not observed on a ROM.
    public static func bootloaderHash(_ data: [UInt8]) -> [UInt8] {
        let keys = roundKeys([UInt8](repeating: 0, count: 16))
        let (k1, _) = subkeys(keys)
        var padded = data
        if padded.count % 16 != 0 { padded += [0x80] + [UInt8](repeating: 0, count: 15 - padded.count % 16) }
        var x = [UInt8](repeating: 0, count: 16)
        let blocks = padded.count / 16
        for i in 0..<blocks {
            var block = zip(x, padded[(16 * i)..<(16 * i + 16)]).map { $0 ^ $1 }
            if i == blocks - 1 { block = zip(block, k1).map { $0 ^ $1 } }
            x = encrypt(block, keys)
        }
        return x
    }
}
