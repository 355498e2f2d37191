//! What happens to a dropped duplicate.

/// Receives each item an operator drops as a duplicate, in order.
///
/// Implemented for every `FnMut(T)` closure, and for [`DropDuplicates`] (the default, which
/// drops them). A broker consumer acks the duplicate here; otherwise the broker redelivers it.
pub trait OnDuplicate<T> {
    /// Called with the dropped item.
    fn on_duplicate(&mut self, item: T);
}

impl<T, F: FnMut(T)> OnDuplicate<T> for F {
    #[inline]
    fn on_duplicate(&mut self, item: T) {
        self(item);
    }
}

/// The default [`OnDuplicate`]: drops the duplicate.
#[derive(Clone, Copy, Debug, Default)]
pub struct DropDuplicates;

impl<T> OnDuplicate<T> for DropDuplicates {
    #[inline]
    fn on_duplicate(&mut self, _item: T) {}
}
