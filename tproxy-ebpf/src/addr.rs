//! Addresses as four network-order words, read and written the way the
//! verifier accepts in contexts and sockets, and their IPv4-mapped forms.

/// One word (or smaller field) of a context, socket or loader-set global,
/// loaded as it is now: the verifier allows only loads of the field's own
/// size there, and the compiler must not fold a global the loader sets.
#[inline(always)]
pub(crate) fn load<T: Copy>(field: &T) -> T {
    // SAFETY: volatile access through a valid reference.
    unsafe { core::ptr::read_volatile(field) }
}

/// Copies an address out of a context or socket one word at a time: the
/// verifier allows only 4-byte loads there, and refuses loads through a
/// moved pointer, which an array copy can be.
#[inline(always)]
pub(crate) fn read_words(words: &[u32; 4]) -> [u32; 4] {
    [load(&words[0]), load(&words[1]), load(&words[2]), load(&words[3])]
}

/// Writes an address into a context one word at a time (see `read_words`).
#[inline(always)]
pub(crate) fn write_words(words: &mut [u32; 4], value: &[u32; 4]) {
    // SAFETY: volatile access through a valid reference.
    unsafe {
        core::ptr::write_volatile(&mut words[0], value[0]);
        core::ptr::write_volatile(&mut words[1], value[1]);
        core::ptr::write_volatile(&mut words[2], value[2]);
        core::ptr::write_volatile(&mut words[3], value[3]);
    }
}

/// `::ffff:0:0/96`, in network order.
#[inline(always)]
pub(crate) fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_be(0xffff)
}

/// `::ffff:` and `v4`, in network order.
#[inline(always)]
pub(crate) fn v4_mapped(v4: u32) -> [u32; 4] {
    [0, 0, u32::from_be(0xffff), v4]
}
