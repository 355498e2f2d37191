//! Macros shared by the adapters.

/// The accessors every adapter has for the stream it pulls from (as futures-util's
/// `delegate_access_inner!`).
macro_rules! delegate_access_inner {
    ($field:ident, $inner:ty) => {
        /// Acquires a reference to the underlying stream that this combinator is pulling from.
        pub fn get_ref(&self) -> &$inner {
            &self.$field
        }

        /// Acquires a mutable reference to the underlying stream that this combinator is
        /// pulling from. It is inadvisable to pull items from it directly: they would bypass
        /// the window.
        pub fn get_mut(&mut self) -> &mut $inner {
            &mut self.$field
        }

        /// Acquires a pinned mutable reference to the underlying stream that this combinator
        /// is pulling from. It is inadvisable to pull items from it directly.
        pub fn get_pin_mut(self: core::pin::Pin<&mut Self>) -> core::pin::Pin<&mut $inner> {
            self.project().$field
        }

        /// Consumes this combinator, returning the underlying stream (items it holds are
        /// dropped; claims already handed out stay valid).
        pub fn into_inner(self) -> $inner {
            self.$field
        }
    };
}
